"""Train several SAE families on the same rows and evaluate them the same way (used by ``report`` and
``synthetic``).

Families (``MethodSpec.family``):

========================  ================================================================================
``topk``                  SAELens TopK (``k`` per sample, auxiliary loss on)
``batchtopk``             SAELens BatchTopK (``k`` on average over the batch; saved as JumpReLU)
``matryoshka_batchtopk``  SAELens Matryoshka BatchTopK (Bussmann et al.: nested dictionary PREFIXES
                          of ``matryoshka_widths``, one loss per prefix; BatchTopK ``k``; saved as JumpReLU)
``relu``                  SAELens standard ReLU SAE with L1 penalty ``l1_coefficient``
``msae_uw``               the plugin's Matryoshka TopK SAE, uniform level weights (``k_levels``)
``msae_rw``               same with reverse weights (sparsest level weighs most)
``a_sae``                 archetypal SAE (TopK encoder, D in conv(C)), candidates = k-means centroids
``ra_sae``                relaxed archetypal SAE (``delta``)
``topk_centroids``        SAELens TopK whose decoder starts at the same centroids as RA-SAE (control)
========================  ================================================================================

The JumpReLU-saved families (BatchTopK, Matryoshka BatchTopK) and ReLU do not hit a nominal k, and nor does a
Matryoshka SAE's ``encode(x, k)`` when its ReLU support is smaller than k: every evaluated row carries the
MEASURED L0 (``l0``, mean non-zero latents per held-out row) next to its nominal k, and comparisons should
use the former.

Every trained SAE is saved as a SAELens inference checkpoint and evaluated after loading it back, so the
numbers describe exactly the weights on disk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import (
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from torch import Tensor

from sae_vision_ext.activations.rows import rows_from_array
from sae_vision_ext.evals.dictionary import decoder_atoms, dictionary_report
from sae_vision_ext.evals.reconstruction import evaluate_sae
from sae_vision_ext.evals.report_config import REPORT_FAMILIES
from sae_vision_ext.evals.representation import cknna, downstream_preservation
from sae_vision_ext.evals.synthetic import identifiability
from sae_vision_ext.evals.train import make_training_sae, to_inference_sae, train_in_memory
from sae_vision_ext.saes.archetypal import (
    ASAETrainingSAEConfig,
    RASAETrainingSAEConfig,
    init_decoder_from_candidates,
)
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKTrainingSAEConfig
from sae_vision_ext.training.candidates import compute_candidates, load_candidates

FAMILIES = (*REPORT_FAMILIES, "topk_centroids")  # the control trains only in stability studies
ARCHETYPAL_FAMILIES = ("a_sae", "ra_sae")
CENTROID_FAMILIES = ("a_sae", "ra_sae", "topk_centroids")


@dataclass
class MethodSpec:
    """One SAE to train. ``seed`` seeds the initialisation (and the batch order); ``kmeans_seed`` picks the
    candidates file. ``setting`` names what the seeds repeat (default: ``name``): runs of one setting differ
    only by their seeds and are averaged together in a report. ``matryoshka_widths``: the prefix widths of
    ``matryoshka_batchtopk`` (default :func:`matryoshka_widths`)."""

    name: str
    family: str
    k: int | None = None
    lr: float = 3e-3
    seed: int = 0
    kmeans_seed: int = 0
    l1_coefficient: float = 1.0
    k_levels: list[int] | None = None
    delta: float = 1.0
    inference_ks: list[int | None] = field(default_factory=lambda: [None])
    matryoshka_widths: list[int] | None = None
    setting: str | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose from {FAMILIES}")
        if self.setting is None:
            self.setting = self.name


def msae_k_levels(d_sae: int, k_min: int) -> list[int]:
    """The MSAE authors' schedule: ``k_min`` doubled until ``d_sae``, then ``d_sae`` itself (plain ReLU
    level)."""
    levels, k = [], k_min
    while k < d_sae:
        levels.append(k)
        k *= 2
    return levels + [d_sae]


def matryoshka_widths(d_sae: int, n_levels: int = 5) -> list[int]:
    """Default prefix widths of ``matryoshka_batchtopk``: ``d_sae`` halved ``n_levels - 1`` times, i.e. for
    ``d_sae = 256``: ``[16, 32, 64, 128, 256]`` (doubling prefixes; the last level is the whole dictionary, as
    SAELens requires). Widths below 1 or repeated are dropped."""
    return sorted({max(1, d_sae >> j) for j in range(n_levels)})


def build_training_sae(
    spec: MethodSpec, d_in: int, d_sae: int, candidates_path: str | Path | None = None
) -> Any:
    """A freshly initialised training SAE for ``spec`` (torch seeded with ``spec.seed``)."""
    torch.manual_seed(spec.seed)
    family = spec.family
    if family in CENTROID_FAMILIES and candidates_path is None:
        raise ValueError(f"{family} needs a candidates file")
    if family == "topk":
        return make_training_sae(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=spec.k))
    if family == "batchtopk":
        return make_training_sae(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=spec.k))
    if family == "matryoshka_batchtopk":
        widths = list(spec.matryoshka_widths or matryoshka_widths(d_sae))
        return make_training_sae(
            MatryoshkaBatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=spec.k, matryoshka_widths=widths)
        )
    if family == "relu":
        return make_training_sae(
            StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=spec.l1_coefficient)
        )
    if family in ("msae_uw", "msae_rw"):
        levels = spec.k_levels or msae_k_levels(d_sae, spec.k or 1)
        weighting = "uniform" if family == "msae_uw" else "reverse"
        cfg = MatryoshkaTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k_levels=levels, level_weighting=weighting
        )
        return make_training_sae(cfg)
    if family in ARCHETYPAL_FAMILIES:
        if family == "a_sae":
            cfg = ASAETrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=spec.k, delta=0.0, candidates_path=str(candidates_path)
            )
        else:
            cfg = RASAETrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=spec.k, delta=spec.delta, candidates_path=str(candidates_path)
            )
        return make_training_sae(cfg)
    # topk_centroids: the control, a plain TopK whose decoder starts where RA-SAE's dictionary starts
    sae = make_training_sae(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=spec.k))
    init_decoder_from_candidates(sae, load_candidates(candidates_path))
    return sae


def make_candidates(x: Tensor, n_candidates: int, seed: int, path: str | Path) -> Path:
    """k-means candidates of ``x`` (the rows the SAE trains on) written to ``path`` (see
    ``training.candidates``)."""
    path = Path(path)
    if not path.exists():
        n_candidates = min(n_candidates, x.shape[0])
        candidates = compute_candidates(
            rows_from_array(x), n_candidates, seed=seed, sample_rows=x.shape[0], progress=False
        )
        candidates.save(path)
    return path


@dataclass
class TrainedSAE:
    spec: MethodSpec
    sae: Any  # the inference SAE loaded back from ``folder``
    folder: Path
    train_seconds: float
    candidates_path: Path | None = None


def train_method(
    spec: MethodSpec,
    x_train: Tensor,
    d_sae: int,
    out_dir: str | Path,
    n_train_rows: int,
    batch_size: int,
    candidates_path: str | Path | None = None,
) -> TrainedSAE:
    """Train ``spec`` on ``x_train`` with SAELens's trainer, save the inference SAE to ``out_dir/name``, load
    it."""
    start = time.perf_counter()
    training_sae = build_training_sae(spec, x_train.shape[1], d_sae, candidates_path)
    training_sae = train_in_memory(
        None,
        x_train,
        n_rows=n_train_rows,
        batch_size=batch_size,
        lr=spec.lr,
        seed=spec.seed,
        sae=training_sae,
    )
    seconds = time.perf_counter() - start
    folder = Path(out_dir) / spec.name
    sae = to_inference_sae(training_sae, folder)
    return TrainedSAE(
        spec=spec,
        sae=sae,
        folder=folder,
        train_seconds=seconds,
        candidates_path=Path(candidates_path) if candidates_path else None,
    )


def atoms_of(sae: Any) -> Tensor:
    """Decoder atoms ``[d_sae, d_in]`` of an inference SAE."""
    return decoder_atoms(sae).float()


def evaluate_all(
    sae: Any,
    x: Tensor,
    encode_kwargs: dict[str, Any] | None = None,
    head: Any | None = None,
    labels: Tensor | None = None,
    true_atoms: Tensor | None = None,
    cknna_rows: int = 1000,
    cknna_topk: int = 10,
    eval_batch_size: int = 4096,
    dictionary: bool = True,
) -> dict[str, Any]:
    """Every metric of the suite for one SAE on rows ``x`` ``[n, d_in]`` (held out from training).

    Reconstruction and sparsity (``evaluate_sae``), CKNNA between ``x[:cknna_rows]`` and its reconstruction,
    downstream preservation of ``head`` (a callable rows -> logits, e.g. ``fit_linear_probe`` or
    ``zero_shot_head``; optional ``labels`` add accuracies), and with ``dictionary`` the decoder's coherence,
    stable rank, atom-to-data cosine distance and (given ``true_atoms``) identifiability.
    """
    encode_kwargs = encode_kwargs or {}
    x = x.reshape(-1, x.shape[-1])
    metrics = evaluate_sae(sae, x.split(eval_batch_size), encode_kwargs=encode_kwargs, progress=False)
    parameter = next(sae.parameters())
    with torch.no_grad():
        recon = torch.cat(
            [
                sae.decode(sae.encode(b.to(parameter), **encode_kwargs)).float().cpu()
                for b in x.split(eval_batch_size)
            ]
        )
    sub = x[:cknna_rows]
    metrics["cknna"] = cknna(sub, recon[: sub.shape[0]], topk=min(cknna_topk, sub.shape[0] - 1))
    if head is not None:
        with torch.no_grad():
            preserved = downstream_preservation(head(x), head(recon), labels)
        metrics.update({f"downstream_{key}": value for key, value in preserved.items()})
    if dictionary:
        atoms = atoms_of(sae)
        metrics.update(dictionary_report(atoms, x[:5000]))
        usable = true_atoms is not None and atoms.shape[0] >= true_atoms.shape[0]
        metrics["identifiability"] = identifiability(atoms, true_atoms) if usable else None
    return metrics


def evaluate_trained(
    trained: TrainedSAE,
    x_test: Tensor,
    head: Any | None = None,
    labels: Tensor | None = None,
    true_atoms: Tensor | None = None,
    cknna_rows: int = 1000,
    cknna_topk: int = 10,
) -> list[dict[str, Any]]:
    """One row of :func:`evaluate_all` metrics per inference k of ``trained`` (dictionary metrics computed
    once). ``k_inference`` is the NOMINAL k (``"relu"``: a Matryoshka SAE's ReLU latents; ``None``: a ReLU
    SAE); ``l0`` is the L0 measured on ``x_test``, which can be smaller (a ReLU support narrower than k) or,
    for JumpReLU-saved BatchTopK SAEs, either side of it. ``setting``, ``seed`` and ``kmeans_seed`` identify
    the run among the seeds of its setting."""
    spec = trained.spec
    rows: list[dict[str, Any]] = []
    for k in spec.inference_ks:
        metrics = evaluate_all(
            trained.sae,
            x_test,
            encode_kwargs={} if k is None else {"k": k},
            head=head,
            labels=labels,
            true_atoms=true_atoms,
            cknna_rows=cknna_rows,
            cknna_topk=cknna_topk,
            dictionary=not rows,
        )
        if rows:
            shared = (
                "coherence_max",
                "coherence_mean_max",
                "stable_rank",
                "atom_data_cosine_distance",
                "identifiability",
            )
            metrics.update({key: rows[0][key] for key in shared})
        msae_relu = k is None and spec.family.startswith("msae")
        rows.append(
            {
                "method": spec.name,
                "setting": spec.setting,
                "family": spec.family,
                "seed": spec.seed,
                "kmeans_seed": spec.kmeans_seed if spec.family in CENTROID_FAMILIES else None,
                "k_train": spec.k,
                "k_inference": "relu" if msae_relu else (k or spec.k),
                **metrics,
                "train_seconds": trained.train_seconds,
                "weights": str(trained.folder),
            }
        )
    return rows


def spec_dict(spec: MethodSpec) -> dict[str, Any]:
    return asdict(spec)
