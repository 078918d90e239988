"""Comparison report: train SAELens TopK / BatchTopK / Matryoshka BatchTopK / ReLU, MSAE (uniform, reverse),
A-SAE and RA-SAE on the same activation rows, each with several seeds, then write tables (markdown + JSON) and
plots (PNG) into one folder.

Protocol
  - Data: ``--data`` is synthetic hierarchical data (default), synthetic sparse data, or a file /
    cached-activation folder (see ``sae_vision_ext.evals.data``). Rows are split into train / test (last
    ``test_fraction``).
  - Preprocessing (default on): ``x' = (x - mu) * s`` with ``mu`` the training mean and ``s = sqrt(d) / E||x -
    mu||`` (the MSAE paper's target ``E||x'|| = sqrt(d)``). Every method sees the same ``x'``; the data are
    centred, as a fair stability measurement needs.
  - Every SAE is trained with SAELens's ``SAETrainer`` for the same number of rows, once per seed (``seeds``:
    init seed and batch order 0, 1, ...; A-SAE / RA-SAE also draw their k-means candidates with that seed),
    saved as a SAELens checkpoint under ``<weights_dir or out>/saes/`` and evaluated after loading it back,
    on the test rows: reconstruction (FVU, per-sample FVU, explained variance, cosine, L0, fraction of zeros,
    dead latents), CKNNA(original, reconstruction), downstream preservation of a linear probe (KL,
    agreement), dictionary coherence, stable rank, cosine distance of atoms from the data and, on synthetic
    data, identifiability against the true atoms.
  - MSAE is evaluated at many inference k (TopK of its ReLU latents) and with ReLU only.
  - Sparsity is the MEASURED L0 (mean non-zero latents per test row), never the nominal k: an MSAE's
    ``encode(x, k)`` keeps fewer than k latents when its ReLU support is smaller, and JumpReLU-saved
    BatchTopK SAEs land either side of k. Tables give mean ± std over the seeds (``results`` in the JSON keeps
    every run); plots put each point at its mean measured L0 with error bars and min-max bands.
  - Matched L0 (:func:`matched_l0`): at each target L0 (the measured L0 of each per-k TopK SAE), every other
    family's FVU is interpolated on its own FVU-vs-L0 curve, seed by seed (:func:`interpolate_fvu`:
    piecewise linear in log L0 between the two measured neighbours), or marked "not reached" when the
    target is outside the L0 range the family measured. Nothing is extrapolated.
  - Stability (mean Hungarian-matched |cosine| between the dictionaries of pairs of runs, averaged over
    pairs): TopK with different init seeds; RA-SAE with different k-means seeds (fair); a TopK SAE initialised
    from the same centroids as RA-SAE (the control); and, for reference, RA-SAE and TopK started from ONE
    shared set of centroids (the original paper's protocol, which inflates stability).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sae_lens
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_vision_ext import __version__
from sae_vision_ext.activations.rows import rows_from_array
from sae_vision_ext.evals.compare import (
    CENTROID_FAMILIES,
    MethodSpec,
    atoms_of,
    evaluate_trained,
    make_candidates,
    matryoshka_widths,
    msae_k_levels,
    spec_dict,
    train_method,
)
from sae_vision_ext.evals.data import load_rows
from sae_vision_ext.evals.plots import plot_fvu_vs_l0, plot_stability
from sae_vision_ext.evals.report_config import ReportConfig
from sae_vision_ext.evals.report_markdown import report_markdown
from sae_vision_ext.evals.representation import fit_linear_probe
from sae_vision_ext.evals.stability import stability
from sae_vision_ext.evals.synthetic import identifiability, random_unit_atoms
from sae_vision_ext.training.candidates import compute_candidates


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
    mu = x_train.mean(dim=0)
    scale = math.sqrt(x_train.shape[1]) / float((x_train - mu).norm(dim=1).mean())
    return (x_train - mu) * scale, (x_test - mu) * scale, {"mean_norm": float(mu.norm()), "scale": scale}


def _labels_for(rows: Any, x_train: Tensor, x_test: Tensor, cfg: ReportConfig) -> tuple[Tensor, str]:
    """Class labels for the downstream probe: ground truth, a file, or k-means pseudo-classes."""
    n_train = x_train.shape[0]
    if rows.synthetic is not None:
        codes = rows.synthetic.codes
        if rows.synthetic.parents is not None:
            codes = codes[:, rows.synthetic.parents < 0]
        return (
            codes.argmax(dim=1),
            "ground truth: the strongest coarse atom"
            if rows.synthetic.parents is not None
            else "ground truth: the strongest atom",
        )
    if cfg.labels is not None:
        labels = torch.as_tensor(torch.load(cfg.labels, weights_only=True)).long().reshape(-1)
        return labels[: n_train + x_test.shape[0]], f"labels from {Path(cfg.labels).resolve()}"
    centroids = compute_candidates(
        rows_from_array(x_train), cfg.n_probe_classes, seed=cfg.seed, progress=False
    ).candidates
    x_all = torch.cat([x_train, x_test])
    return torch.cdist(x_all, centroids).argmin(dim=1), f"k-means pseudo-classes ({cfg.n_probe_classes})"


# -------------------------------------------------------------------------------------- seeds and matched L0
# row keys that identify a run rather than measure it: not averaged over seeds
_RUN_KEYS = ("seed", "kmeans_seed", "k_train", "k_inference", "n_rows", "d_sae")


def spread(values: Iterable[float], key: str) -> dict[str, Any]:
    """``{key: mean, key_std: sample std (None for one value), key_min, key_max}`` of ``values`` (all None
    when empty)."""
    values = [float(v) for v in values]
    if not values:
        return {key: None, f"{key}_std": None, f"{key}_min": None, f"{key}_max": None}
    return {
        key: statistics.fmean(values),
        f"{key}_std": statistics.stdev(values) if len(values) > 1 else None,
        f"{key}_min": min(values),
        f"{key}_max": max(values),
    }


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seed_summary(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, nominal k) of the per-seed ``results``: every numeric metric as mean, std, min
    and max over the seeds (:func:`spread`), with ``n_seeds``, ``seeds`` and ``runs``. ``method`` is the
    setting's name; ``l0`` is the mean MEASURED L0."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["setting"], str(row["k_inference"])), []).append(row)
    summary = []
    for rows in groups.values():
        first = rows[0]
        entry: dict[str, Any] = {
            "method": first["setting"],
            "family": first["family"],
            "k_train": first["k_train"],
            "k_inference": first["k_inference"],
            "n_seeds": len(rows),
            "seeds": [row["seed"] for row in rows],
            "runs": [row["method"] for row in rows],
        }
        keys = dict.fromkeys(key for row in rows for key, value in row.items() if _numeric(value))
        for key in keys:
            if key not in _RUN_KEYS:
                entry.update(spread((row[key] for row in rows if _numeric(row.get(key))), key))
        summary.append(entry)
    return summary


def interpolate_fvu(points: Iterable[tuple[float, float]], l0: float, rtol: float = 1e-6) -> float | None:
    """FVU of one run's FVU-vs-L0 curve at ``l0``, or None when ``l0`` lies outside the L0 range of
    ``points`` (``(measured L0, FVU)`` pairs): never extrapolates.

    The points are sorted by L0 (points within ``rtol`` of each other in L0 are merged, FVU averaged) and
    FVU is linear in log L0 between the two measured neighbours of ``l0``: piecewise linear, so the value
    always lies between those two FVUs (monotone between measurements, no overshoot). An ``l0`` within
    ``rtol`` (relative) of a measured L0 gets that point's FVU, so a single point covers exactly its own L0.
    Points with L0 <= 0 or a non-finite FVU are ignored.
    """
    merged: list[tuple[float, list[float]]] = []
    for x, fvu in sorted((float(a), float(f)) for a, f in points if a > 0 and math.isfinite(f)):
        if merged and x <= merged[-1][0] * (1 + rtol):
            merged[-1][1].append(fvu)
        else:
            merged.append((x, [fvu]))
    if not merged or l0 <= 0:
        return None
    xs = [x for x, _ in merged]
    ys = [statistics.fmean(fvus) for _, fvus in merged]
    for x, y in zip(xs, ys):
        if abs(l0 - x) <= rtol * x:
            return y
    if l0 < xs[0] or l0 > xs[-1]:
        return None
    upper = next(i for i, x in enumerate(xs) if x > l0)
    x0, x1, y0, y1 = math.log(xs[upper - 1]), math.log(xs[upper]), ys[upper - 1], ys[upper]
    return y0 + (math.log(l0) - x0) / (x1 - x0) * (y1 - y0)


def _seed_curves(results: Iterable[dict[str, Any]], **match: Any) -> dict[int, list[tuple[float, float]]]:
    """``{seed: [(measured L0, FVU), ...]}`` of the rows whose fields equal ``match`` (``setting=...``)."""
    curves: dict[int, list[tuple[float, float]]] = {}
    for row in results:
        if all(row.get(key) == value for key, value in match.items()):
            curves.setdefault(row["seed"], []).append((row["l0"], row["fvu"]))
    return curves


def _curve_at(curves: dict[int, list[tuple[float, float]]], l0_of_seed: dict[int, float]) -> dict[str, Any]:
    """Each seed's curve interpolated at that seed's target L0, as :func:`spread` over the seeds that reach
    it, with ``n_reached``, ``n_seeds``, the measured L0 range and ``per_seed`` values (None: not reached)."""
    per_seed = []
    for seed, points in sorted(curves.items()):
        if seed not in l0_of_seed:
            continue
        l0s = [a for a, _ in points]
        per_seed.append(
            {
                "seed": seed,
                "target_l0": l0_of_seed[seed],
                "fvu": interpolate_fvu(points, l0_of_seed[seed]),
                "l0_min": min(l0s),
                "l0_max": max(l0s),
            }
        )
    reached = [p["fvu"] for p in per_seed if p["fvu"] is not None]
    return {
        **spread(reached, "fvu"),
        "n_reached": len(reached),
        "n_seeds": len(per_seed),
        "l0_min": min((p["l0_min"] for p in per_seed), default=None),
        "l0_max": max((p["l0_max"] for p in per_seed), default=None),
        "per_seed": per_seed,
    }


def matched_l0(results: Sequence[dict[str, Any]], topk_ks: Sequence[int]) -> list[dict[str, Any]]:
    """FVU of every family at the measured L0 of each per-k TopK SAE.

    For TopK at ``k`` the target is its L0 measured on the test rows, averaged over its seeds. Every other
    setting (an MSAE's curve over its inference k and ReLU mode; the single point of a BatchTopK, ReLU,
    A-SAE ... run) is interpolated at the target seed by seed with :func:`interpolate_fvu`; the seeds whose
    measured L0 range does not cover the target count as not reached (``n_reached < n_seeds``; None FVU when
    no seed reaches it).
    """
    settings = list(dict.fromkeys(row["setting"] for row in results if row["family"] != "topk"))
    entries = []
    for k in topk_ks:
        at_k = [row for row in results if row["family"] == "topk" and row["k_train"] == k]
        if not at_k:
            continue
        target = statistics.fmean(row["l0"] for row in at_k)
        entry: dict[str, Any] = {
            "k": k,
            "target_l0": target,
            "topk": {**spread((row["fvu"] for row in at_k), "fvu"), "n_seeds": len(at_k)},
            "families": {},
        }
        for setting in settings:
            curves = _seed_curves(results, setting=setting)
            entry["families"][setting] = _curve_at(curves, dict.fromkeys(curves, target))
        entries.append(entry)
    return entries


def topk_at_family_l0(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The other direction: for each non-TopK setting and nominal k, the per-k TopK curve (same seed)
    interpolated at that run's measured L0 (``topk_fvu``), beside the run's own FVU; not reached outside the
    TopK ks' L0 range."""
    topk = _seed_curves(results, family="topk")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        if row["family"] != "topk":
            groups.setdefault((row["setting"], str(row["k_inference"])), []).append(row)
    entries = []
    for rows in groups.values():
        at = _curve_at(topk, {row["seed"]: row["l0"] for row in rows})
        entries.append(
            {
                "method": rows[0]["setting"],
                "k_inference": rows[0]["k_inference"],
                **spread((row["l0"] for row in rows), "l0"),
                **spread((row["fvu"] for row in rows), "fvu"),
                **spread((p["fvu"] for p in at["per_seed"] if p["fvu"] is not None), "topk_fvu"),
                "n_reached": at["n_reached"],
                "n_seeds": len(rows),
                "topk_l0_min": at["l0_min"],
                "topk_l0_max": at["l0_max"],
            }
        )
    return entries


def fvu_at_nominal_k(summary: Sequence[dict[str, Any]], topk_ks: Sequence[int]) -> list[dict[str, Any]]:
    """TopK trained at k against the MSAEs evaluated at inference k, at NOMINAL k, with the measured L0 of
    each (the comparison the matched-L0 table replaces)."""
    entries = []
    for k in topk_ks:
        entry: dict[str, Any] = {"k": k}
        for row in summary:
            if (row["family"] == "topk" and row["k_train"] == k) or (
                row["family"].startswith("msae") and row["k_inference"] == k
            ):
                name = row["family"]
                entry.update({name: row["fvu"], f"{name}_std": row["fvu_std"], f"{name}_l0": row["l0"]})
        entries.append(entry)
    return entries


def fvu_points(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary rows as points of :func:`plot_fvu_vs_l0`, each at its mean MEASURED L0 with the spread
    over seeds (std error bars, min-max band): one line for the TopK SAEs, one per other setting (an MSAE's
    line runs over its inference k), labelled with the nominal k."""
    points = []
    for row in summary:
        k = row["k_inference"]
        points.append(
            {
                "group": "topk" if row["family"] == "topk" else row["method"],
                "label": "" if k is None else (f"k={k}" if _numeric(k) else str(k)),
                "l0": row["l0"],
                "fvu": row["fvu"],
                "l0_std": row["l0_std"],
                "fvu_std": row["fvu_std"],
                "fvu_min": row["fvu_min"],
                "fvu_max": row["fvu_max"],
                "n_seeds": row["n_seeds"],
            }
        )
    return points


# ---------------------------------------------------------------------------------------------------- runner
class _Runner:
    """Trains each distinct spec once (cached by name) and computes candidates per k-means seed once."""

    def __init__(self, cfg: ReportConfig, x_train: Tensor, out: Path, bar: Any = None):
        self.cfg, self.x_train = cfg, x_train
        self.out = Path(cfg.weights_dir) if cfg.weights_dir else out  # root of saes/ and candidates/
        self.bar = bar  # a tqdm bar over the report's steps: the run in progress goes in its postfix
        self.trained: dict[str, Any] = {}
        self.candidates: dict[int, Path] = {}

    def candidates_for(self, kmeans_seed: int) -> Path:
        if kmeans_seed not in self.candidates:
            path = self.out / "candidates" / f"kmeans_seed{kmeans_seed}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            n = max(self.cfg.n_candidates, self.cfg.d_sae + 1)
            self.candidates[kmeans_seed] = make_candidates(self.x_train, n, kmeans_seed, path)
        return self.candidates[kmeans_seed]

    def train(self, spec: MethodSpec) -> Any:
        if spec.name not in self.trained:
            candidates = self.candidates_for(spec.kmeans_seed) if spec.family in CENTROID_FAMILIES else None
            if self.bar is not None and not self.bar.disable:
                self.bar.set_postfix_str(f"training {spec.name}")
            else:
                print(f"[report] training {spec.name}", file=sys.stderr, flush=True)
            self.trained[spec.name] = train_method(
                spec,
                self.x_train,
                self.cfg.d_sae,
                self.out / "saes",
                self.cfg.n_train_rows,
                self.cfg.batch_size,
                candidates_path=candidates,
            )
        return self.trained[spec.name]


def _spec(cfg: ReportConfig, family: str, k: int | None, seed: int = 0, kmeans_seed: int = 0) -> MethodSpec:
    setting = family if k is None or family in ("msae_uw", "msae_rw") else f"{family}_k{k}"
    name = setting
    if seed:
        name += f"_seed{seed}"
    if kmeans_seed:
        name += f"_kmeans{kmeans_seed}"
    spec = MethodSpec(
        name=name,
        family=family,
        k=k,
        lr=cfg.lr,
        seed=seed,
        kmeans_seed=kmeans_seed,
        l1_coefficient=cfg.relu_l1,
        delta=cfg.delta,
        setting=setting,
    )
    if family in ("msae_uw", "msae_rw"):
        spec.k_levels = msae_k_levels(cfg.d_sae, cfg.msae_k_min)
        spec.inference_ks = [k for k in cfg.inference_ks if k <= cfg.d_sae] + [None]
    if family == "matryoshka_batchtopk":
        spec.matryoshka_widths = list(cfg.matryoshka_widths) or matryoshka_widths(cfg.d_sae)
    return spec


def main_specs(cfg: ReportConfig) -> list[MethodSpec]:
    """Every run of the main comparison: each family's settings, once per seed in ``range(cfg.seeds)``
    (the A-SAE / RA-SAE runs of seed s also use the k-means candidates of seed s)."""
    specs = []
    for seed in range(max(1, cfg.seeds)):
        for family in cfg.families:
            kmeans_seed = seed if family in CENTROID_FAMILIES else 0
            if family == "topk":
                specs.extend(_spec(cfg, "topk", k, seed=seed) for k in cfg.topk_ks)
            elif family in ("relu", "msae_uw", "msae_rw"):
                specs.append(_spec(cfg, family, None, seed=seed))
            else:
                specs.append(_spec(cfg, family, cfg.k, seed=seed, kmeans_seed=kmeans_seed))
    return specs


def stability_protocols(cfg: ReportConfig) -> list[tuple[str, list[MethodSpec]]]:
    seeds = range(cfg.stability_seeds)
    k = cfg.k
    return [
        ("TopK, random init, init seed varies", [_spec(cfg, "topk", k, seed=s) for s in seeds]),
        (
            "RA-SAE, k-means seed varies (fair)",
            [_spec(cfg, "ra_sae", k, seed=s, kmeans_seed=s) for s in seeds],
        ),
        (
            "TopK from the same centroids as RA-SAE, k-means seed varies (control)",
            [_spec(cfg, "topk_centroids", k, seed=s, kmeans_seed=s) for s in seeds],
        ),
        (
            "RA-SAE, one shared set of centroids (paper protocol)",
            [_spec(cfg, "ra_sae", k, seed=s) for s in seeds],
        ),
        (
            "TopK from one shared set of centroids (control)",
            [_spec(cfg, "topk_centroids", k, seed=s) for s in seeds],
        ),
    ]


def _pairwise_stability(trained: list[Any]) -> tuple[float, list[float]]:
    values = [stability(atoms_of(a.sae), atoms_of(b.sae)) for a, b in itertools.combinations(trained, 2)]
    return sum(values) / len(values), values


def _identifiability_rows(results: list[dict[str, Any]], true_atoms: Tensor, cfg: ReportConfig) -> list[dict]:
    """Identifiability of each setting (mean, std, min, max over its seeds and the per-seed values), with a
    perfect (permuted true) and a random dictionary as baselines."""
    generator = torch.Generator().manual_seed(cfg.seed + 12345)
    n_true = true_atoms.shape[0]
    rows = [
        {
            "method": "true atoms, permuted (baseline)",
            "identifiability": identifiability(
                true_atoms[torch.randperm(n_true, generator=generator)], true_atoms
            ),
        }
    ]
    if cfg.d_sae >= n_true:
        random_atoms = random_unit_atoms(cfg.d_sae, true_atoms.shape[1], generator)
        rows.append(
            {
                "method": f"random unit atoms, {cfg.d_sae} (baseline)",
                "identifiability": identifiability(random_atoms, true_atoms),
            }
        )
    per_run: dict[str, dict[str, float]] = {}  # setting -> run -> value (one value per run, not per k)
    for row in results:
        if row["identifiability"] is not None:
            per_run.setdefault(row["setting"], {})[row["method"]] = row["identifiability"]
    for setting, values in per_run.items():
        rows.append(
            {
                "method": setting,
                **spread(values.values(), "identifiability"),
                "n_seeds": len(values),
                "per_seed": values,
            }
        )
    return rows


def report_steps(cfg: ReportConfig) -> int:
    """Steps of :func:`run_report`'s progress bar: data, one per main run (family setting x seed), one per
    stability protocol, output."""
    n_stability = len(stability_protocols(cfg)) if cfg.stability and cfg.stability_seeds >= 2 else 0
    return 2 + len(main_specs(cfg)) + n_stability


def run_report(cfg: ReportConfig, command: str | None = None, progress: bool = True) -> Path:
    """Run the whole comparison and write ``results.md``, ``results.json`` and the PNG plots into ``cfg.out``.

    ``progress`` shows a tqdm bar on stderr over the report's steps (:func:`report_steps`), the run being
    trained in its postfix; without it each training prints one ``[report] training NAME`` line.
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    bar = tqdm(
        total=report_steps(cfg),
        unit="step",
        desc="report: data and probe",
        disable=not progress,
        dynamic_ncols=True,
    )

    rows = load_rows(
        cfg.data,
        key=cfg.key,
        max_rows=cfg.max_rows,
        seed=cfg.seed,
        synthetic_kwargs=cfg.synthetic_kwargs if cfg.data.startswith("synthetic") else None,
    )
    x = rows.x.float()
    n_test = max(cfg.cknna_rows // 2, int(cfg.test_fraction * x.shape[0]))
    if x.shape[0] - n_test < cfg.batch_size:
        raise ValueError(
            f"{x.shape[0]} rows are too few for a test split of {n_test} and batch {cfg.batch_size}"
        )
    x_train, x_test = x[:-n_test], x[-n_test:]
    preprocessing = {"standardize": cfg.standardize}
    if cfg.standardize:
        x_train, x_test, stats = _standardize(x_train, x_test)
        preprocessing.update(stats)
    true_atoms = rows.synthetic.atoms if rows.synthetic is not None else None

    labels, labels_description = _labels_for(rows, x_train, x_test, cfg)
    labels_train, labels_test = labels[: x_train.shape[0]], labels[x_train.shape[0] :]
    probe = fit_linear_probe(x_train[:20000], labels_train[:20000])
    bar.update()

    runner = _Runner(cfg, x_train, out, bar=bar)
    results: list[dict[str, Any]] = []
    bar.set_description("report: methods")
    for spec in main_specs(cfg):
        trained = runner.train(spec)
        results.extend(
            evaluate_trained(
                trained,
                x_test,
                head=probe,
                labels=labels_test,
                true_atoms=true_atoms,
                cknna_rows=cfg.cknna_rows,
            )
        )
        bar.update()

    stability_rows: list[dict[str, Any]] = []
    if cfg.stability and cfg.stability_seeds >= 2:
        bar.set_description("report: stability")
        for protocol, specs in stability_protocols(cfg):
            trained = [runner.train(spec) for spec in specs]
            mean, values = _pairwise_stability(trained)
            stability_rows.append(
                {
                    "protocol": protocol,
                    "stability": mean,
                    "pairs": values,
                    "runs": [t.spec.name for t in trained],
                }
            )
            bar.update()
    bar.set_description("report: tables and plots")
    bar.set_postfix_str("")

    summary = seed_summary(results)
    identifiability_rows = _identifiability_rows(results, true_atoms, cfg) if true_atoms is not None else []

    fvu_plot = out / "fvu_vs_l0.png"
    plot_fvu_vs_l0(
        fvu_points(summary),
        fvu_plot,
        title=f"FVU against measured L0 (mean of {max(1, cfg.seeds)} seed(s); bars: std, bands: min-max)",
        log_fvu=True,
        fvu_label="FVU (test rows)",
    )
    stability_plot = out / "stability.png" if stability_rows else None
    if stability_plot is not None:
        plot_stability(stability_rows, stability_plot)
    elapsed = time.perf_counter() - started
    weights = [
        {
            "name": t.spec.name,
            "folder": str(t.folder),
            "architecture": t.sae.cfg.architecture(),
            "candidates": str(t.candidates_path) if t.candidates_path else None,
            "spec": spec_dict(t.spec),
        }
        for t in runner.trained.values()
    ]
    payload = {
        "command": command,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {
            "sae_vision_ext": __version__,
            "sae_lens": sae_lens.__version__,
            "torch": torch.__version__,
        },
        "config": asdict(cfg),
        "data": {
            "source": cfg.data,
            "description": rows.description,
            "n_train": x_train.shape[0],
            "n_test": x_test.shape[0],
            "d_in": x.shape[1],
            "preprocessing": preprocessing,
            "probe_labels": labels_description,
        },
        "weights": weights,
        "summary": summary,
        "fvu_at_matched_l0": matched_l0(results, cfg.topk_ks),
        "topk_at_family_l0": topk_at_family_l0(results),
        "fvu_at_nominal_k": fvu_at_nominal_k(summary, cfg.topk_ks),
        "results": results,
        "stability": stability_rows,
        "identifiability": identifiability_rows,
        "seconds": elapsed,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(report_markdown(payload, fvu_plot, stability_plot))
    bar.update()
    bar.close()
    return out / "results.md"
