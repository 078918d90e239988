"""``results.md`` of a comparison report (:func:`~sae_vision_ext.evals.report.run_report`): markdown tables of
the metrics, with the protocol written out next to them. Metrics are means over the seeds with their spread
(``mean ± std``); L0 is always the measured one, printed next to the nominal k."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MAIN_COLUMNS = [
    ("method", "method"), ("k_inference", "k (nominal)"), ("l0", "L0 (measured)"),
    ("fraction_zero", "frac. zero"), ("fvu", "FVU"), ("fvu_per_sample", "FVU/sample"),
    ("explained_variance", "EV"), ("cosine", "cos"),
    ("dead_fraction", "dead"), ("cknna", "CKNNA"), ("downstream_kl", "probe KL"),
    ("downstream_agreement", "probe agr."), ("coherence_mean_max", "coherence"),
    ("stable_rank", "stable rank"), ("atom_data_cosine_distance", "atom-data dist."),
    ("identifiability", "identif."), ("train_seconds", "train s"),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------- helpers
def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_spread(row: dict[str, Any], key: str) -> str:
    """``row[key]`` with its spread over seeds: ``mean ± std`` when ``row[key + "_std"]`` is a number, else
    the value alone (one seed, or a key that does not vary)."""
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None or not isinstance(std, (int, float)):
        return format_value(value)
    return f"{format_value(value)} ± {std:.2g}"


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], spread: bool = False) -> str:
    """Markdown table of ``rows`` with ``(key, header)`` columns; missing values print as ``-``. ``spread``:
    values carry their ``key_std`` (:func:`format_spread`)."""
    cell = format_spread if spread else (lambda row, key: format_value(row.get(key)))
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(row, key) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _range(low: float | None, high: float | None) -> str:
    if low is None:
        return "-"
    if high is None or math.isclose(low, high, rel_tol=1e-3):
        return format_value(low)
    return f"{format_value(low)}–{format_value(high)}"


def matched_cell(entry: dict[str, Any], what: str = "L0") -> str:
    """A cell of the matched-L0 tables: ``mean ± std`` over the seeds that reach the target (``(n/N
    seeds)`` when not all do), or ``not reached`` with the measured L0 range that misses it."""
    if not entry["n_reached"]:
        return f"not reached ({what} {_range(entry['l0_min'], entry['l0_max'])})"
    text = format_spread(entry, "fvu")
    if entry["n_reached"] < entry["n_seeds"]:
        text += f" ({entry['n_reached']}/{entry['n_seeds']} seeds)"
    return text


def matched_l0_table(entries: list[dict[str, Any]]) -> str:
    """One row per TopK target L0, one column per other setting (:func:`matched_cell`)."""
    settings = list(dict.fromkeys(name for entry in entries for name in entry["families"]))
    rows = [
        {
            "k": entry["k"],
            "target": format_value(entry["target_l0"]),
            "topk": format_spread(entry["topk"], "fvu"),
            **{name: matched_cell(value) for name, value in entry["families"].items()},
        }
        for entry in entries
    ]
    columns = [("k", "TopK k"), ("target", "target L0"), ("topk", "TopK FVU")]
    return markdown_table(rows, columns + [(name, name) for name in settings])


def _topk_at_family_table(entries: list[dict[str, Any]]) -> str:
    rows = [
        {
            **entry,
            "l0_cell": format_spread(entry, "l0"),
            "fvu_cell": format_spread(entry, "fvu"),
            "topk_cell": matched_cell(
                {
                    "fvu": entry["topk_fvu"],
                    "fvu_std": entry["topk_fvu_std"],
                    "n_reached": entry["n_reached"],
                    "n_seeds": entry["n_seeds"],
                    "l0_min": entry["topk_l0_min"],
                    "l0_max": entry["topk_l0_max"],
                },
                what="TopK L0",
            ),
        }
        for entry in entries
    ]
    columns = [
        ("method", "method"),
        ("k_inference", "k (nominal)"),
        ("l0_cell", "L0 (measured)"),
        ("fvu_cell", "FVU"),
        ("topk_cell", "TopK FVU at that L0"),
    ]
    return markdown_table(rows, columns)


def _nominal_k_table(entries: list[dict[str, Any]]) -> str:
    names = ("topk", "msae_uw", "msae_rw")
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"k": entry["k"]}
        for name in names:
            if name in entry:
                row[name] = f"{format_spread(entry, name)} (L0 {format_value(entry[name + '_l0'])})"
        rows.append(row)
    return markdown_table(
        rows,
        [("k", "k"), ("topk", "TopK trained at k"), ("msae_uw", "MSAE UW at k"), ("msae_rw", "MSAE RW at k")],
    )


def report_markdown(payload: dict[str, Any], fvu_plot: Path, stability_plot: Path | None) -> str:
    """``results.md``: the report's tables and plots from ``payload`` (the content of ``results.json``)."""
    data, cfg = payload["data"], payload["config"]
    n_seeds = max(1, cfg.get("seeds", 1))
    pre = data["preprocessing"]
    lines = ["# SAE comparison report", ""]
    if payload["command"]:
        lines += [f"Command: `{payload['command']}`", ""]
    lines += [
        f"Generated {payload['date']} in {payload['seconds']:.0f} s with sae-vision-ext "
        f"{payload['versions']['sae_vision_ext']}, SAELens {payload['versions']['sae_lens']}, "
        f"torch {payload['versions']['torch']}.",
        "",
        "## Data",
        "",
        f"- Source: {data['description']}",
        f"- Rows: {data['n_train']} for training, {data['n_test']} held out for every metric below; "
        f"d_in = {data['d_in']}.",
        "- Preprocessing: "
        + (
            f"centred on the training mean (norm {pre['mean_norm']:.4g}) and scaled by {pre['scale']:.4g} "
            "so that E||x|| = sqrt(d)."
            if pre["standardize"]
            else "none (raw rows; the data are NOT centred)."
        ),
        "- Downstream probe: a linear probe trained on the original training rows; "
        f"labels = {data['probe_labels']}.",
        "",
        "## Weights",
        "",
        f"Every SAE below was trained here (SAELens `SAETrainer`, {cfg['n_train_rows']} rows, batch "
        f"{cfg['batch_size']}, lr {cfg['lr']} constant then linear decay over the last 20%, "
        f"d_sae = {cfg['d_sae']}) once per seed ({n_seeds} seeds: init seed and batch order; A-SAE / RA-SAE "
        "also draw their k-means candidates with that seed) and saved as a SAELens checkpoint; the metrics "
        "come from the checkpoint loaded back. MSAE k levels: the nested TopK levels it was trained with; "
        "Matryoshka BatchTopK widths: its nested dictionary prefixes.",
        "",
        markdown_table(
            [
                {
                    "name": w["name"],
                    "architecture": w["architecture"],
                    "k": w["spec"]["k"],
                    "seed": w["spec"]["seed"],
                    "kmeans": w["spec"]["kmeans_seed"] if w["candidates"] else None,
                    "folder": w["folder"],
                    "levels": w["spec"]["k_levels"] or w["spec"].get("matryoshka_widths"),
                }
                for w in payload["weights"]
            ],
            [
                ("name", "run"),
                ("architecture", "architecture"),
                ("k", "k"),
                ("levels", "k levels / widths"),
                ("seed", "init seed"),
                ("kmeans", "k-means seed"),
                ("folder", "checkpoint"),
            ],
        ),
        "",
        f"## Reconstruction, sparsity and preservation (test rows, mean ± std over {n_seeds} seeds)",
        "",
        "k (nominal) = the k asked for: trained k (TopK, A-SAE, RA-SAE), batch-average target (BatchTopK, "
        "Matryoshka BatchTopK, saved as JumpReLU), inference k of the MSAE (relu: its ReLU latents only); "
        "L0 (measured) = mean number of non-zero latents per test row, what every comparison below uses "
        "(an MSAE asked for k keeps fewer when its ReLU support is smaller). "
        "FVU = sum||x - x_hat||^2 / sum||x - mean||^2; FVU/sample = mean over rows of mean_d (x_hat - x)^2 / "
        "mean_d (x - mean_d x)^2 (each row centred on its own mean); EV = 1 - FVU; "
        "dead = fraction of latents firing on fewer than 10^-5.5 of the test rows; CKNNA (top-10 mutual "
        "neighbours) between original and reconstructed rows; probe KL (nats) and agreement of the linear "
        "probe on the reconstruction vs the original; coherence = mean over atoms of the largest |cos| with "
        "another atom; atom-data dist. = mean over atoms of 1 - max cos with a test row. train s = "
        "wall-clock training time, which depends on the machine's load as much as on the method. "
        "Every value is the mean over the seeds ± their sample standard deviation; the per-seed rows follow "
        "below and in results.json.",
        "",
        markdown_table(payload["summary"], [*MAIN_COLUMNS, ("n_seeds", "seeds")], spread=True),
        "",
        f"![FVU against measured L0]({fvu_plot.name})",
        "",
        "Each point sits at its mean measured L0 and is annotated with its nominal k and that L0; error bars "
        "are ± one std over the seeds (both axes), shaded bands the min-max FVU over the seeds.",
        "",
        "## FVU at matched L0",
        "",
        "Targets: the measured L0 of each per-k TopK SAE (mean over its seeds). Every other setting's FVU "
        "there is interpolated on its own FVU-vs-L0 curve, seed by seed, piecewise linearly in log L0 "
        "between its two measured neighbours (an MSAE's curve runs over its inference k and ReLU mode; "
        "the other families have one point per seed, which covers only its own L0), then averaged over the "
        "seeds that reach the target (mean ± std; `(n/N seeds)` when not all do). `not reached` gives the "
        "L0 range the setting measured, which does not contain the target: nothing is extrapolated.",
        "",
        matched_l0_table(payload["fvu_at_matched_l0"]),
        "",
        "## TopK at each setting's measured L0",
        "",
        "The other direction, which also places the settings that have a single L0 (BatchTopK, Matryoshka "
        "BatchTopK, ReLU, A-SAE, RA-SAE): for every other setting and nominal k, the per-k TopK curve of the "
        "same seed interpolated (the same way) at that run's measured L0, next to the run's own FVU.",
        "",
        _topk_at_family_table(payload["topk_at_family_l0"]),
        "",
        "## FVU at nominal k (not equal L0)",
        "",
        "TopK trained at each k against ONE Matryoshka SAE evaluated at that inference k, with the L0 each "
        "really reaches: where the MSAE's L0 is below k this is not a comparison at equal sparsity (see the "
        "matched-L0 table).",
        "",
        _nominal_k_table(payload["fvu_at_nominal_k"]),
        "",
        "<details><summary>Every run (per seed)</summary>",
        "",
        markdown_table(payload["results"], [("method", "run"), ("seed", "seed"), *MAIN_COLUMNS[1:]]),
        "",
        "</details>",
    ]
    if payload["identifiability"]:
        lines += [
            "",
            "## Identifiability (synthetic data, known atoms)",
            "",
            "Mean cosine between each true atom and its Hungarian-matched decoder atom (signs count: codes "
            "are non-negative), mean ± std over the seeds. The SAE's atoms are compared after the "
            "preprocessing, which only shifts and scales rows, so the true directions are unchanged.",
            "",
            markdown_table(
                payload["identifiability"],
                [("method", "dictionary"), ("identifiability", "identif."), ("n_seeds", "seeds")],
                spread=True,
            ),
        ]
    if payload["stability"]:
        lines += [
            "",
            "## Stability across runs",
            "",
            "Mean over pairs of runs of the mean Hungarian-matched |cosine| between decoder atoms, "
            f"k = {cfg['k']}, {cfg['stability_seeds']} runs each, on the same (centred) training rows. "
            "Only the first two protocols and the control are a fair comparison; the shared-centroid rows "
            "repeat the original paper's protocol. A run named as in the main table is the same checkpoint.",
            "",
            markdown_table(
                payload["stability"], [("protocol", "protocol"), ("stability", "stability"), ("runs", "runs")]
            ),
            "",
            f"![stability]({stability_plot.name})" if stability_plot else "",
        ]
    return "\n".join(lines) + "\n"
