"""``results.md`` of a comparison report (:func:`~sae_vision_ext.evals.report.run_report`): markdown tables of
the metrics, with the protocol written out next to them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MAIN_COLUMNS = [
    ("method", "method"), ("k_inference", "k"), ("l0", "L0"), ("fraction_zero", "frac. zero"),
    ("fvu", "FVU"), ("fvu_per_sample", "FVU/sample"), ("explained_variance", "EV"), ("cosine", "cos"),
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


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``(key, header)`` columns; missing values print as ``-``."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_value(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def report_markdown(payload: dict[str, Any], fvu_plot: Path, stability_plot: Path | None) -> str:
    """``results.md``: the report's tables and plots from ``payload`` (the content of ``results.json``)."""
    data, cfg = payload["data"], payload["config"]
    pre = data["preprocessing"]
    lines = [
        "# SAE comparison report",
        "",
        f"Generated {payload['date']} in {payload['seconds']:.0f} s with sae-vision-ext "
        f"{payload['versions']['sae_vision_ext']}, SAELens {payload['versions']['sae_lens']}, "
        f"torch {payload['versions']['torch']}.",
    ]
    if payload["command"]:
        lines += ["", f"Command: `{payload['command']}`"]
    lines += [
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
        f"d_sae = {cfg['d_sae']}) and saved as a SAELens checkpoint; the metrics come from the checkpoint "
        "loaded back.",
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
                    "levels": w["spec"]["k_levels"],
                }
                for w in payload["weights"]
            ],
            [
                ("name", "run"),
                ("architecture", "architecture"),
                ("k", "k"),
                ("levels", "MSAE k levels"),
                ("seed", "init seed"),
                ("kmeans", "k-means seed"),
                ("folder", "checkpoint"),
            ],
        ),
        "",
        "## Reconstruction, sparsity and preservation (test rows)",
        "",
        "FVU = sum||x - x_hat||^2 / sum||x - mean||^2; FVU/sample = mean over rows of mean_d (x_hat - x)^2 / "
        "mean_d (x - mean_d x)^2 (each row centred on its own mean); EV = 1 - FVU; L0 = mean active latents; "
        "dead = fraction of latents firing on fewer than 10^-5.5 of the test rows; CKNNA (top-10 mutual "
        "neighbours) between original and reconstructed rows; probe KL (nats) and agreement of the linear "
        "probe on the reconstruction vs the original; coherence = mean over atoms of the largest |cos| with "
        "another atom; atom-data dist. = mean over atoms of 1 - max cos with a test row. MSAE rows at "
        "k = relu use ReLU latents only. train s = wall-clock training time, which depends on the machine's "
        "load as much as on the method.",
        "",
        markdown_table(payload["results"], MAIN_COLUMNS),
        "",
        f"![FVU against L0]({fvu_plot.name})",
        "",
        "## FVU at matched k",
        "",
        "TopK trained at each k against ONE Matryoshka SAE evaluated at that inference k.",
        "",
        markdown_table(
            payload["fvu_at_matched_k"],
            [("k", "k"), ("topk", "TopK (trained at k)"), ("msae_uw", "MSAE UW"), ("msae_rw", "MSAE RW")],
        ),
    ]
    if payload["identifiability"]:
        lines += [
            "",
            "## Identifiability (synthetic data, known atoms)",
            "",
            "Mean cosine between each true atom and its Hungarian-matched decoder atom (signs count: codes "
            "are non-negative). The SAE's atoms are compared after the preprocessing, which only shifts and "
            "scales rows, so the true directions are unchanged.",
            "",
            markdown_table(
                payload["identifiability"], [("method", "dictionary"), ("identifiability", "identif.")]
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
            "repeat the original paper's protocol.",
            "",
            markdown_table(
                payload["stability"], [("protocol", "protocol"), ("stability", "stability"), ("runs", "runs")]
            ),
            "",
            f"![stability]({stability_plot.name})" if stability_plot else "",
        ]
    return "\n".join(lines) + "\n"
