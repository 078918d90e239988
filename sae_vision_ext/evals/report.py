"""Comparison report: train SAELens TopK / BatchTopK / ReLU, MSAE (uniform, reverse), A-SAE and RA-SAE on the
same activation rows, then write tables (markdown + JSON) and plots (PNG) into one folder.

Protocol
  - Data: ``--data`` is synthetic hierarchical data (default), synthetic sparse data, or a file /
    cached-activation folder (see ``sae_vision_ext.evals.data``). Rows are split into train / test (last
    ``test_fraction``).
  - Preprocessing (default on): ``x' = (x - mu) * s`` with ``mu`` the training mean and ``s = sqrt(d) / E||x -
    mu||`` (the MSAE paper's target ``E||x'|| = sqrt(d)``). Every method sees the same ``x'``; the data are
    centred, as a fair stability measurement needs.
  - Every SAE is trained with SAELens's ``SAETrainer`` for the same number of rows, saved as a SAELens
    checkpoint under ``<out>/saes/`` and evaluated after loading it back, on the test rows: reconstruction
    (FVU, per-sample FVU, explained variance, cosine, L0, fraction of zeros, dead latents), CKNNA(original,
    reconstruction), downstream preservation of a linear probe (KL, agreement), dictionary coherence, stable
    rank, cosine distance of atoms from the data and, on synthetic data, identifiability against the true
    atoms.
  - MSAE is evaluated at many inference k (TopK of its ReLU latents) and with ReLU only.
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
import sys
import time
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


def _fvu_points(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's rows as points of :func:`plot_fvu_vs_l0`: one line for the TopK SAEs, one per other
    method."""
    return [
        {
            "group": row["family"] if row["family"] == "topk" else row["method"],
            "l0": row["l0"],
            "fvu": row["fvu"],
        }
        for row in results
    ]


# ---------------------------------------------------------------------------------------------------- runner
class _Runner:
    """Trains each distinct spec once (cached by name) and computes candidates per k-means seed once."""

    def __init__(self, cfg: ReportConfig, x_train: Tensor, out: Path, bar: Any = None):
        self.cfg, self.x_train, self.out = cfg, x_train, out
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
    name = family if k is None else f"{family}_k{k}"
    if family in ("msae_uw", "msae_rw"):
        name = family
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
    )
    if family in ("msae_uw", "msae_rw"):
        spec.k_levels = msae_k_levels(cfg.d_sae, cfg.msae_k_min)
        spec.inference_ks = [k for k in cfg.inference_ks if k <= cfg.d_sae] + [None]
    return spec


def main_specs(cfg: ReportConfig) -> list[MethodSpec]:
    specs = []
    for family in cfg.families:
        if family == "topk":
            specs.extend(_spec(cfg, "topk", k) for k in cfg.topk_ks)
        elif family == "relu":
            specs.append(_spec(cfg, "relu", None))
        elif family in ("msae_uw", "msae_rw"):
            specs.append(_spec(cfg, family, None))
        else:
            specs.append(_spec(cfg, family, cfg.k))
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
    """Identifiability of each trained SAE, with a perfect (permuted true) and a random dictionary as
    baselines."""
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
    seen = set()
    for row in results:
        if row["method"] not in seen and row["identifiability"] is not None:
            seen.add(row["method"])
            rows.append({"method": row["method"], "identifiability": row["identifiability"]})
    return rows


def report_steps(cfg: ReportConfig) -> int:
    """Steps of :func:`run_report`'s progress bar: data, one per main method, one per stability protocol,
    output."""
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

    # FVU at matched k: TopK trained at k vs MSAE evaluated at inference k (nested k should help)
    matched = []
    for k in cfg.topk_ks:
        entry: dict[str, Any] = {"k": k}
        for row in results:
            if row["family"] == "topk" and row["k_train"] == k:
                entry["topk"] = row["fvu"]
            if row["family"].startswith("msae") and row["k_inference"] == k:
                entry[row["family"]] = row["fvu"]
        matched.append(entry)

    identifiability_rows = _identifiability_rows(results, true_atoms, cfg) if true_atoms is not None else []

    fvu_plot = out / "fvu_vs_l0.png"
    plot_fvu_vs_l0(_fvu_points(results), fvu_plot, log_fvu=True, fvu_label="FVU (test rows)")
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
        "results": results,
        "fvu_at_matched_k": matched,
        "stability": stability_rows,
        "identifiability": identifiability_rows,
        "seconds": elapsed,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(report_markdown(payload, fvu_plot, stability_plot))
    bar.update()
    bar.close()
    return out / "results.md"
