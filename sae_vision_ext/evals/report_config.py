"""``ReportConfig``: sizes and settings of a comparison report (``run_report``; ``sae-vision report``), and
``synthetic_report_config`` for the synthetic benchmarks (``sae-vision synthetic``).

Kept apart from :mod:`sae_vision_ext.evals.report` (which imports torch) so that the commands' ``--help``,
built from these fields, stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sae_vision_ext.training.config import option

# the SAE families a report trains (evals.compare.FAMILIES without the stability-only topk_centroids)
REPORT_FAMILIES = (
    "topk",
    "batchtopk",
    "matryoshka_batchtopk",
    "relu",
    "msae_uw",
    "msae_rw",
    "a_sae",
    "ra_sae",
)


@dataclass
class ReportConfig:
    """Sizes and settings of a report run: the defaults are the full-size synthetic run, ``tiny()`` tests."""

    out: str = option(
        "sae_report",
        "--output",
        required=True,
        help="output folder (results.md, results.json, PNGs; saes/ and candidates/ unless --weights-dir)",
    )
    weights_dir: str | None = option(
        None,
        help="folder for the trained checkpoints (saes/) and k-means candidates (candidates/) "
        "(None: the output folder)",
    )
    data: str = option(
        "synthetic-hierarchical",
        help="synthetic-hierarchical, synthetic-sparse, or a "
        ".pt/.npy/.safetensors file or cached-activation folder",
    )
    key: str | None = option(None, help="tensor key or dataset column (hook name) inside --data")
    max_rows: int | None = option(32768, help="use at most this many rows of --data (synthetic: rows made)")
    synthetic_kwargs: dict = option(
        dict(d_in=64, n_coarse=32, n_fine=4, k_coarse=3, noise_std=0.01), cmd=False
    )
    labels: str | None = option(None, help=".pt tensor of class labels for the downstream probe")
    test_fraction: float = option(0.125, help="held-out fraction of the rows (the last ones)")
    standardize: bool = option(
        True, negative_option="--no-standardize", help="centre and scale the rows (or train on raw rows)"
    )
    d_sae: int = option(256, help="latents of every SAE")
    topk_ks: list[int] = option([3, 6, 12, 24], metavar="K", help="k values of the TopK SAEs")
    k: int = option(6, help="k of BatchTopK, Matryoshka BatchTopK, A-SAE, RA-SAE and the stability runs")
    matryoshka_widths: list[int] = option(
        [],
        metavar="W",
        help="prefix widths of matryoshka_batchtopk, increasing, the last one d_sae "
        "(none given: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae)",
    )
    msae_k_min: int = option(3, help="first MSAE level (then doubled up to d_sae)")
    inference_ks: list[int] = option(
        [1, 2, 3, 6, 12, 24, 48, 96], metavar="K", help="inference k values of the MSAE"
    )
    relu_l1: float = option(0.5, help="L1 coefficient of the ReLU SAE")
    n_train_rows: int = option(262144, help="rows seen by each SAE in training")
    batch_size: int = option(512, help="rows per training step")
    lr: float = option(3e-3, help="learning rate")
    n_candidates: int = option(1024, help="k-means candidates of A-SAE / RA-SAE")
    delta: float = option(1.0, help="RA-SAE relaxation bound")
    seeds: int = option(
        3,
        help="runs of every family, init seed 0..seeds-1 (A-SAE / RA-SAE: k-means seed too); tables give "
        "mean ± std over them, plots error bars and min-max bands",
    )
    stability_seeds: int = option(3, help="runs per stability protocol (below 2: no stability study)")
    families: list[str] = option(
        list(REPORT_FAMILIES),
        choices=REPORT_FAMILIES,
        metavar="FAMILY",
        help=f"SAE families to train: {', '.join(REPORT_FAMILIES)}",
    )
    stability: bool = option(True, cmd=False)
    n_probe_classes: int = option(16, help="classes of the downstream linear probe")
    cknna_rows: int = option(1000, help="rows of the CKNNA estimate")
    seed: int = option(
        0, help="seed of the synthetic data and of the probe's k-means pseudo-classes (SAE seeds: --seeds)"
    )

    @classmethod
    def tiny(cls, **overrides: Any) -> ReportConfig:
        values = dict(
            max_rows=2048,
            synthetic_kwargs=dict(d_in=16, n_coarse=6, n_fine=2, k_coarse=2, noise_std=0.01),
            d_sae=32,
            topk_ks=[2, 4, 8],
            k=4,
            msae_k_min=2,
            inference_ks=[1, 2, 4, 8, 16],
            n_train_rows=1536,
            batch_size=128,
            n_candidates=96,
            seeds=2,
            stability_seeds=2,
            n_probe_classes=4,
            cknna_rows=200,
        )
        values.update(overrides)
        return cls(**values)


def synthetic_report_config(
    kind: str = "sparse",
    tiny: bool = False,
    d_in: int | None = None,
    n_atoms: int | None = None,
    n_coarse: int | None = None,
    n_fine: int | None = None,
    true_k: int | None = None,
    **overrides: Any,
) -> ReportConfig:
    """The ``ReportConfig`` of a synthetic benchmark run: data of ``kind`` (``sparse`` or ``hierarchical``)
    and SAE sizes that follow its ground truth (``tiny``: test sizes). ``true_k``: active true atoms per row
    (sparse) or active coarse atoms per row (hierarchical). ``overrides`` are ``ReportConfig`` fields;
    ``d_sae`` (default: the number of true atoms) also sizes the k-means candidates (``>= 4 * d_sae``)."""
    if kind == "sparse":
        data = dict(
            d_in=d_in or (12 if tiny else 32),
            n_atoms=n_atoms or (16 if tiny else 64),
            k=true_k or (2 if tiny else 4),
            noise_std=0.01,
        )
        n_true = data["n_atoms"]
        k = data["k"]
    elif kind == "hierarchical":
        data = dict(
            d_in=d_in or (16 if tiny else 64),
            n_coarse=n_coarse or (6 if tiny else 32),
            n_fine=n_fine or (2 if tiny else 4),
            k_coarse=true_k or (2 if tiny else 3),
            noise_std=0.01,
        )
        n_true = data["n_coarse"] * (1 + data["n_fine"])
        k = 2 * data["k_coarse"]
    else:
        raise ValueError(f"kind must be 'sparse' or 'hierarchical', got {kind!r}")
    d_sae = overrides.pop("d_sae", None) or n_true
    base = ReportConfig.tiny() if tiny else ReportConfig()
    base.data = f"synthetic-{kind}"
    base.synthetic_kwargs = data
    base.d_sae = d_sae
    base.k = k
    base.topk_ks = sorted({max(1, k // 2), k, 2 * k})
    base.msae_k_min = max(1, k // 2)
    base.inference_ks = sorted({1, *base.topk_ks, 4 * k})
    base.n_candidates = max(base.n_candidates, 4 * d_sae)
    base.families = list(REPORT_FAMILIES)
    base.stability_seeds = 0
    base.stability = False
    return dataclasses.replace(base, **overrides)
