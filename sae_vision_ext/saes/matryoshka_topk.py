"""Matryoshka SAE with nested TopK levels (MSAE; Zaigrajew, Baniecki & Biecek, ICML 2025, arXiv 2502.20578).

One encoder, one dictionary. Several TopK operators with increasing k act on the SAME latents, so the supports
are nested (top-k_1 of z within top-k_2 of z within ...):

    x_s   = (x - mu) * s                       optional input standardisation (mu, s kept as buffers)
    pre   = (x_s - b_dec) @ W_enc + b_enc
    z     = relu(pre)                          the inference latents (ReLU, the paper's default)
    z_i   = z restricted to its k_i largest entries
    x_i   = z_i @ D + b_dec                    D: decoder rows, unit norm during training
    loss  = sum_i a_i L(x_i, x_s) / sum_i a_i  L: "mse" (sum over d, mean over batch) or "nmse"

with a_i = 1 ("uniform", UW) or a_i = h - i + 1 ("reverse", RW: the sparsest level weighs most) or explicit
weights. A level with k = d_sae is the plain ReLU level. No L1 term, no auxiliary loss, no resampling.

This is not SAELens's ``matryoshka_batchtopk`` (Bussmann et al.: nested dictionary prefixes); the architecture
name here is ``matryoshka_topk``.

Training forward (``nested_topk_reconstructions``): one encoder pass and one chain of ``topk`` calls serve every
level. Every level with k at least the largest number of positive latents in a row of the batch equals the ReLU
level and reuses its single dense decode. Because the supports are nested, the other levels are built from
their neighbours: level i = level i-1 + the latents of ranks k_{i-1}..k_i ("head" band), or level i+1 minus the
positive latents of ranks k_i..k_{i+1} ("tail"); narrow bands are decoded by gathering decoder rows, and a level
whose bands would be wide is decoded as one masked dense matmul. A cost model picks the cheapest plan per batch;
all plans give the same values and gradients as h independent dense decodes (tested).

Decoder norm: with ``normalize_decoder`` the training SAE decodes with D = W_dec / ||W_dec|| (row-wise) and
renormalises W_dec in place at the start of every training step. SAELens's ``SAETrainer`` has no hook around
the optimiser step, so this parametrisation is the extension point: at ||w|| = 1 the gradient of w / ||w|| is
(I - w w^T) g, i.e. the authors' "remove the gradient component parallel to each decoder row", and the in-place
renormalisation after each step changes nothing in the function. Saved weights hold the unit-norm rows.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import nn

from sae_vision_ext.saes import register

ARCHITECTURE_NAME = "matryoshka_topk"

# Cost model of the nested decode (forward + backward, per batch row), in units of one latent of a dense masked
# level: a dense level costs DENSE_LEVEL_COST * d_sae (three matmuls plus the mask), one gathered latent
# GATHER_COST (gathers are memory-bound and the sampled matmul of the backward is not vectorised). Measured on a
# 2-core AVX-512 CPU with torch 2.14 (see the issue-3 note); only the plan choice depends on them.
GATHER_COST = 8.0
DENSE_LEVEL_COST = 1.0
# gathers run over column tiles of the gathered table at most this wide (0: no tiles), narrower when the table
# has many rows, so that the tile stays in a core's L2 cache (measured best on a 2 MiB-L2 AVX-512 core)
DECODE_TILE_WIDTH = 64
TILE_BYTES = 3 * 2**20

StandardizeScale = Literal["paper", "authors_code"]


# ----------------------------------------------------------------------------------------------------------------
# configuration helpers
# ----------------------------------------------------------------------------------------------------------------


def default_k_levels(d_sae: int, k_start: int = 64) -> list[int]:
    """The authors' ladder: k_start, doubling while below d_sae, then d_sae itself (the ReLU level).

    >>> default_k_levels(6144)
    [64, 128, 256, 512, 1024, 2048, 4096, 6144]
    """
    levels = []
    k = k_start
    while k < d_sae:
        levels.append(k)
        k *= 2
    levels.append(d_sae)
    return levels


def validate_k_levels(k_levels: Sequence[int], d_sae: int) -> list[int]:
    """Check that k_levels is a non-empty, strictly increasing list of integers in [1, d_sae]."""
    levels = list(k_levels)
    if len(levels) == 0:
        raise ValueError("k_levels must not be empty: give at least one k, e.g. k_levels=[64, d_sae]")
    for k in levels:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k_levels must hold integers, got {k!r} in {levels}")
        if k < 1:
            raise ValueError(f"k_levels must be positive, got {k} in {levels}")
        if k > d_sae:
            raise ValueError(f"k_levels entry {k} is larger than d_sae={d_sae} (k_levels={levels})")
    for k_prev, k_next in zip(levels[:-1], levels[1:]):
        if k_next <= k_prev:
            raise ValueError(f"k_levels must be strictly increasing, got {levels}")
    return levels


def parse_level_weighting(level_weighting: str | Sequence[float]) -> str | list[float]:
    """Normalise ``level_weighting``: "uniform", "reverse", or explicit weights (a list, or "1,2,3" / "[1,2,3]")."""
    if isinstance(level_weighting, str):
        text = level_weighting.strip()
        if text.lower() in ("uniform", "uw"):
            return "uniform"
        if text.lower() in ("reverse", "rw"):
            return "reverse"
        numbers = text.strip("[]()").replace(",", " ").split()
        try:
            return [float(v) for v in numbers] if numbers else _bad_weighting(level_weighting)
        except ValueError:
            _bad_weighting(level_weighting)
    return [float(v) for v in level_weighting]


def _bad_weighting(level_weighting: Any):
    raise ValueError(
        f"level_weighting must be 'uniform', 'reverse' or a list of non-negative weights, got {level_weighting!r}"
    )


def level_weights(level_weighting: str | Sequence[float], n_levels: int) -> list[float]:
    """Weights a_i normalised to sum to 1: uniform a_i = 1, reverse a_i = h - i + 1 (i = 1..h), or explicit."""
    parsed = parse_level_weighting(level_weighting)
    if parsed == "uniform":
        raw = [1.0] * n_levels
    elif parsed == "reverse":
        raw = [float(n_levels - i) for i in range(n_levels)]
    else:
        raw = list(parsed)
        if len(raw) != n_levels:
            raise ValueError(f"level_weighting has {len(raw)} weights but there are {n_levels} k_levels")
        if any((not math.isfinite(w)) or w < 0 for w in raw):
            raise ValueError(f"level_weighting weights must be finite and non-negative, got {raw}")
        if sum(raw) <= 0:
            raise ValueError(f"level_weighting weights must not all be zero, got {raw}")
    total = sum(raw)
    return [w / total for w in raw]


def check_k(k: Any, d_sae: int, name: str = "k") -> int | None:
    """``k`` as an int in [1, d_sae], or None (the ReLU latents); anything else is one clear ValueError."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= d_sae:
        raise ValueError(f"{name} must be an integer in [1, d_sae={d_sae}] (None: ReLU latents); got {k!r}")
    return int(k)


def _validate_common(cfg: Any) -> None:
    if cfg.d_in < 1 or cfg.d_sae < 1:
        raise ValueError(f"d_in and d_sae must be positive, got d_in={cfg.d_in}, d_sae={cfg.d_sae}")
    if cfg.k_levels is None:
        cfg.k_levels = default_k_levels(cfg.d_sae)
    cfg.k_levels = validate_k_levels(cfg.k_levels, cfg.d_sae)
    cfg.inference_k = check_k(cfg.inference_k, cfg.d_sae, "inference_k")


@dataclass
class MatryoshkaTopKSAEConfig(SAEConfig):
    """Inference config of the nested-TopK Matryoshka SAE.

    Args:
        k_levels: the training levels (default: the authors' ladder 64, 128, ... < d_sae, then d_sae). Kept so
            ``reconstructions()`` knows the trained ks; inference may use any k.
        inference_k: None -> ``encode`` returns the ReLU latents (the paper's default); an int -> TopK of the
            ReLU latents. ``encode(x, k=...)`` overrides it per call.
        standardize_input: the SAE holds buffers ``input_mean`` [d_in] and ``input_scale`` [] and encodes
            (x - input_mean) * input_scale; ``decode`` maps back, so callers pass and get raw activations.
    """

    k_levels: list[int] | None = None
    inference_k: int | None = None
    standardize_input: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE_NAME

    def __post_init__(self):
        super().__post_init__()
        _validate_common(self)


@dataclass
class MatryoshkaTopKTrainingSAEConfig(TrainingSAEConfig):
    """Training config of the nested-TopK Matryoshka SAE.

    Args:
        k_levels: nested TopK levels, strictly increasing, each in [1, d_sae]; k = d_sae is the ReLU level.
            Default: the authors' ladder (64 doubling below d_sae, then d_sae).
        level_weighting: "uniform" (UW), "reverse" (RW: a_i = h - i + 1) or explicit non-negative weights.
        reconstruction_loss: "mse" (the paper's equation: squared error summed over d, mean over the batch) or
            "nmse" (the authors' code: per sample sum_d (x_hat - x)^2 / sum_d (x - batch mean)^2, batch mean).
        normalize_decoder: decode with unit-norm decoder rows and drop the radial gradient component.
        inference_k, standardize_input: see ``MatryoshkaTopKSAEConfig``.
        standardize_scale: how the input scale is estimated: "paper" s = sqrt(d) / E||x - mu|| (so the mean
            norm becomes sqrt(d)), or "authors_code" s = sqrt(d) / E||x - mu||^2.
        decoder_init_norm: tied initialisation W_enc = W_dec^T with rows of this norm (0.1).
    """

    k_levels: list[int] | None = None
    level_weighting: str | list[float] = "uniform"
    reconstruction_loss: Literal["mse", "nmse"] = "mse"
    normalize_decoder: bool = True
    inference_k: int | None = None
    standardize_input: bool = False
    standardize_scale: Literal["paper", "authors_code"] = "paper"

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE_NAME

    def __post_init__(self):
        _validate_common(self)
        self.level_weighting = parse_level_weighting(self.level_weighting)
        level_weights(self.level_weighting, len(self.k_levels))  # validates explicit weights
        if self.reconstruction_loss not in ("mse", "nmse"):
            raise ValueError(f"reconstruction_loss must be 'mse' or 'nmse', got {self.reconstruction_loss!r}")
        if self.standardize_scale not in ("paper", "authors_code"):
            raise ValueError(
                f"standardize_scale must be 'paper' or 'authors_code', got {self.standardize_scale!r}"
            )
        if self.normalize_decoder and self.normalize_activations == "covariance_whitening":
            raise ValueError(
                "normalize_activations='covariance_whitening' cannot be folded into a unit-norm decoder; "
                "use normalize_decoder=False or another normalisation"
            )
        super().__post_init__()

    def get_inference_config_class(self) -> type[SAEConfig]:
        return MatryoshkaTopKSAEConfig


# ----------------------------------------------------------------------------------------------------------------
# the nested decode
# ----------------------------------------------------------------------------------------------------------------


def nested_topk_reconstructions(
    acts: torch.Tensor,
    decoder: torch.Tensor,
    k_levels: Sequence[int],
    scores: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``[topk_k(acts) @ decoder for k in k_levels]`` (no bias), exactly, sharing work between the levels.

    acts: [B, n] non-negative latents; decoder: [n, d]; k_levels strictly increasing. The top-k sets are those
    of ``scores`` (default: acts), taken from one chain of ``topk`` calls, so they are nested. Differentiable in
    acts and decoder.

    Let p_s be the number of positive latents of row s. Every level with k >= max_s p_s equals the full decode
    ``acts @ decoder`` (one dense matmul shared by all of them, the ReLU level included). Each other level i is
    built by the cheapest of (chosen per batch by ``plan_nested_decode``):

    - "head":  x_i = x_{i-1} + band_i, band_i = latents of ranks k_{i-1}..k_i, decoded by gathering their
      decoder rows (``gather_decode``);
    - "tail":  x_i = x_{i+1} - (positive latents of ranks k_i..k_{i+1}) decoded the same way;
    - "dense": x_i = (acts masked to its top-k_i) @ decoder.
    All gathered bands of a batch and the shared dense decode are one autograd Function, whose backward adds
    the gathered latents' gradients into the dense gradient in place.
    """
    levels = list(k_levels)
    B, n = acts.shape
    if B == 0:
        return [acts.new_zeros(0, decoder.shape[-1]) for _ in levels]
    with torch.no_grad():
        positive = acts > 0
        counts = positive.sum(-1, dtype=torch.int32)  # an int32 sum of bools is ~8x faster than int64
        max_active = int(counts.max())
    partial = [k for k in levels if k < max_active]
    if not partial:
        return [acts @ decoder] * len(levels)
    full_needed = len(partial) < len(levels)
    plan = plan_nested_decode(partial, counts, n, full_available=full_needed)

    with torch.no_grad():
        sets, bands = _nested_topk_sets(acts if scores is None else scores, partial, plan)

    def mask_of(k: int) -> torch.Tensor:
        return torch.zeros_like(positive).scatter_(-1, sets[k], True)

    # every gathered band (head bands and tails) goes through one _GatherDecode call
    head = [i for i, method in enumerate(plan) if method == "head"]
    tail = [i for i, method in enumerate(plan) if method == "tail"]
    rows, cols, sizes = [], [], []
    with torch.no_grad():
        if head:
            head_cols = torch.cat([bands[i] for i in head], dim=-1)
            cols.append(head_cols.reshape(-1))
            rows.append(torch.arange(B, device=acts.device).repeat_interleave(head_cols.shape[1]))
            bounds = [0] + partial
            sizes.append(torch.tensor([bounds[i + 1] - bounds[i] for i in head], device=acts.device).repeat(B))
        for i in tail:  # positive latents ranked between k_i and the next level (or all positives)
            in_upper = mask_of(partial[i + 1]) & positive if i + 1 < len(partial) else positive
            tail_rows, tail_cols = (in_upper & ~mask_of(partial[i])).nonzero(as_tuple=True)
            rows.append(tail_rows)
            cols.append(tail_cols)
            sizes.append(torch.bincount(tail_rows, minlength=B))
    if rows:
        with torch.no_grad():
            flat_rows, flat_cols, bag_sizes = torch.cat(rows), torch.cat(cols), torch.cat(sizes)
            offsets = torch.cat([bag_sizes.new_zeros(1), bag_sizes.cumsum(0)[:-1]])
        full, out = _GatherDecode.apply(acts, decoder, flat_rows * n + flat_cols, flat_cols, offsets, full_needed)
        d = decoder.shape[-1]
        head_out, tail_out = out.split([B * len(head), B * len(tail)])
        gathered = list(head_out.view(B, len(head), d).unbind(1)) + list(tail_out.view(len(tail), B, d).unbind(0))
    else:
        full, gathered = (acts @ decoder if full_needed else None), []
    decoded_band = dict(zip(head + tail, gathered))
    outputs: dict[int, torch.Tensor] = {k: full for k in levels[len(partial) :]}

    for i, k in enumerate(partial):  # bottom-up: head and dense levels
        if plan[i] == "head":
            outputs[k] = decoded_band[i] if i == 0 else outputs[partial[i - 1]] + decoded_band[i]
        elif plan[i] == "dense":
            outputs[k] = (acts * mask_of(k)) @ decoder
    for i in reversed(tail):  # top-down: tail levels
        upper = outputs[partial[i + 1]] if i + 1 < len(partial) else full
        outputs[partial[i]] = upper - decoded_band[i]
    return [outputs[k] for k in levels]


def plan_nested_decode(
    partial: Sequence[int], counts: torch.Tensor, n: int, full_available: bool
) -> list[str]:
    """Choose "head" / "tail" / "dense" per level to minimise the estimated cost (see module constants).

    Costs per batch row: head = GATHER_COST * band width, tail = GATHER_COST * mean number of positive latents
    between the level and the next one, dense = DENSE_LEVEL_COST * n. A tail level needs the
    level above it and a head level the one below, so a "tail" level directly below a "head" one is not allowed.
    """
    m = len(partial)
    counts_f = counts.double()
    cost: list[dict[str, float]] = []
    for i, k in enumerate(partial):
        options = {"dense": DENSE_LEVEL_COST * n, "head": GATHER_COST * (k - (partial[i - 1] if i else 0))}
        if i + 1 < m or full_available:
            upper = partial[i + 1] if i + 1 < m else n
            options["tail"] = GATHER_COST * float((counts_f - k).clamp(0, upper - k).mean())
        cost.append(options)
    # dynamic programme over the method of the previous level
    best: dict[str, tuple[float, list[str]]] = {m_: (c, [m_]) for m_, c in cost[0].items()}
    for i in range(1, m):
        new: dict[str, tuple[float, list[str]]] = {}
        for method, c in cost[i].items():
            candidates = [
                (prev_cost + c, path + [method])
                for prev_method, (prev_cost, path) in best.items()
                if not (prev_method == "tail" and method == "head")
            ]
            if candidates:
                new[method] = min(candidates, key=lambda t: t[0])
        best = new
    return min(best.values(), key=lambda t: t[0])[1]


def _nested_topk_sets(
    ranked: torch.Tensor, partial: Sequence[int], plan: Sequence[str]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Index sets {k: [B, k]} of the top-k of ``ranked`` for the sizes the plan needs, and the bands
    {i: [B, k_i - k_{i-1}]} (latents of ranks k_{i-1}..k_i) of its head levels.

    One chain of unsorted ``topk`` calls, largest k first, each on the previous result (so the sets are nested
    and only the first call sees all latents); a head level's band is what the next call leaves out.
    """
    needed = set()
    for i, method in enumerate(plan):
        needed.add(partial[i])
        if method == "head" and i > 0:
            needed.add(partial[i - 1])
        if method == "tail" and i + 1 < len(partial):
            needed.add(partial[i + 1])
    head_sizes = {partial[i]: i for i, method in enumerate(plan) if method == "head"}
    sets: dict[int, torch.Tensor] = {}
    bands: dict[int, torch.Tensor] = {}
    values, indices, previous = ranked, None, None
    for k in sorted(needed, reverse=True):
        values, local = torch.topk(values, k, dim=-1, sorted=False)
        if indices is not None and previous in head_sizes:  # the band of the previous (larger) size
            left_out = torch.ones(indices.shape, dtype=torch.bool, device=indices.device).scatter_(-1, local, False)
            bands[head_sizes[previous]] = indices[left_out].view(indices.shape[0], -1)
        indices = local if indices is None else indices.gather(-1, local)
        sets[k], previous = indices, k
    if 0 in head_sizes.values():
        bands[0] = sets[partial[0]]
    return sets, bands


def gather_decode(
    weights: torch.Tensor, decoder: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """out[b] = sum_{e in bag b} weights[e] * decoder[indices[e]]; bag b holds entries offsets[b]..offsets[b+1].

    Same values as ``F.embedding_bag(indices, decoder, offsets, per_sample_weights=weights, mode="sum")`` with a
    faster backward: the decoder gradient is one gather over the entries sorted by latent (instead of a scatter),
    the weight gradient one sampled matmul. All three work on column tiles of the table they gather from, so
    the rows they touch stay in cache.
    """
    positions = torch.arange(weights.shape[0], device=weights.device)
    return _GatherDecode.apply(weights, decoder, positions, indices, offsets, False)[1]


def _tile_width(table: torch.Tensor) -> int:
    """Widest power-of-two tile up to DECODE_TILE_WIDTH whose rows fit in TILE_BYTES (the table width if 0)."""
    rows, width = table.shape
    tile = DECODE_TILE_WIDTH
    while tile > 8 and rows * tile * table.element_size() > TILE_BYTES:
        tile //= 2
    return tile if 0 < tile < width else width


def _column_tiles(table: torch.Tensor, tile: int) -> list[torch.Tensor]:
    """Contiguous column tiles of a 2-D table (one copy when the width divides)."""
    rows, width = table.shape
    if width % tile == 0:
        return list(table.reshape(rows, width // tile, tile).transpose(0, 1).contiguous().unbind(0))
    return [table[:, a : a + tile].contiguous() for a in range(0, width, tile)]


def _tiled_bag_sum(indices, tiles, offsets, weights) -> torch.Tensor:
    parts = [F.embedding_bag(indices, t, offsets, per_sample_weights=weights, mode="sum") for t in tiles]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class _GatherDecode(torch.autograd.Function):
    """(acts @ decoder, or an empty tensor when not ``with_full``; bag sums of the entries
    ``acts.flatten()[positions]`` times ``decoder[indices]``). One Function for both, so the backward adds the
    gathered entries' gradients into the dense one in place instead of through a dense scatter."""

    @staticmethod
    def forward(ctx, acts, decoder, positions, indices, offsets, with_full):
        weights = acts.reshape(-1).index_select(0, positions)
        decoder_tiles = _column_tiles(decoder, _tile_width(decoder))
        ctx.save_for_backward(acts, decoder, weights, positions, indices, offsets, *decoder_tiles)
        ctx.with_full = with_full
        full = acts @ decoder if with_full else acts.new_empty(0)
        return full, _tiled_bag_sum(indices, decoder_tiles, offsets, weights)

    @staticmethod
    def backward(ctx, grad_full, grad_bands):
        acts, decoder, weights, positions, indices, offsets, *decoder_tiles = ctx.saved_tensors
        n_bags, n_entries, n_latents = offsets.shape[0], indices.shape[0], decoder.shape[0]
        need_acts, need_decoder = ctx.needs_input_grad[:2]
        grad_acts = grad_decoder = None
        if ctx.with_full and grad_full is not None:
            grad_acts = grad_full @ decoder.t() if need_acts else None
            grad_decoder = acts.t() @ grad_full if need_decoder else None
        if grad_bands is None:
            return grad_acts, grad_decoder, None, None, None, None
        width = min(_tile_width(grad_bands), decoder_tiles[0].shape[1])
        grad_tiles = _column_tiles(grad_bands, width)
        if width != decoder_tiles[0].shape[1]:  # the sampled matmul pairs tiles of the same columns
            decoder_tiles = _column_tiles(decoder, width)
        if need_acts:
            # grad_weights[e] = grad_bands[bag(e)] . decoder[indices[e]]: a matmul sampled at the entries
            crow = torch.cat([offsets, offsets.new_tensor([n_entries])])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                dots = torch.sparse_csr_tensor(
                    crow, indices, weights.new_zeros(n_entries), (n_bags, n_latents), check_invariants=False
                )
                for g, d in zip(grad_tiles, decoder_tiles):  # accumulate in place: no copy of the pattern
                    torch.sparse.sampled_addmm(dots, g, d.t(), beta=1.0, out=dots)
            if grad_acts is None:
                grad_acts = torch.zeros_like(acts)
            grad_acts.view(-1).index_add_(0, positions, dots.values())
        if need_decoder:
            # grad_decoder[j] = sum_{e: indices[e] = j} weights[e] * grad_bands[bag(e)]: a bag sum per latent;
            # sorting the narrowest integer type that holds the latent ids is the cheapest (int16: 2x int32)
            key_dtype = torch.int16 if n_latents <= 2**15 else torch.int32 if n_latents <= 2**31 else torch.int64
            order = torch.sort(indices.to(key_dtype), stable=True).indices
            bag_sizes = torch.diff(offsets, append=offsets.new_tensor([n_entries]))
            bag_of_entry = torch.repeat_interleave(torch.arange(n_bags, device=offsets.device), bag_sizes)
            per_latent = torch.bincount(indices, minlength=n_latents)
            latent_offsets = torch.cat([per_latent.new_zeros(1), per_latent.cumsum(0)[:-1]])
            band_grad = _tiled_bag_sum(
                bag_of_entry.index_select(0, order), grad_tiles, latent_offsets, weights.index_select(0, order)
            )
            grad_decoder = band_grad if grad_decoder is None else grad_decoder.add_(band_grad)
        return grad_acts, grad_decoder, None, None, None, None


def naive_topk_reconstructions(
    acts: torch.Tensor, decoder: torch.Tensor, k_levels: Sequence[int], scores: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Reference: one independent ``topk`` and one dense decode per level (h dense decodes)."""
    ranked = acts if scores is None else scores
    outputs = []
    for k in k_levels:
        indices = torch.topk(ranked, k, dim=-1).indices
        sparse = torch.zeros_like(acts).scatter(-1, indices, acts.gather(-1, indices))
        outputs.append(sparse @ decoder)
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# input standardisation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_input_standardization(
    batches: Iterable[torch.Tensor],
    n_batches: int | None = None,
    scale: StandardizeScale = "paper",
) -> tuple[torch.Tensor, float]:
    """Estimate (mu, s) for x -> (x - mu) * s from batches of rows [B, d] (the first ``n_batches`` of them).

    mu = E[x]; "paper": s = sqrt(d) / E||x - mu|| (mean norm of the standardised rows becomes sqrt(d));
    "authors_code": s = sqrt(d) / E||x - mu||^2 (the authors' code, no square root in the denominator).
    Exact two-pass estimate over the batches (they are held in memory).
    """
    if scale not in ("paper", "authors_code"):
        raise ValueError(f"scale must be 'paper' or 'authors_code', got {scale!r}")
    rows = [b.reshape(-1, b.shape[-1]).double() for b in islice(iter(batches), n_batches)]
    rows = [r for r in rows if r.shape[0] > 0]
    if not rows:
        raise ValueError("estimate_input_standardization needs at least one non-empty batch")
    d = rows[0].shape[-1]
    count = sum(r.shape[0] for r in rows)
    mean = sum(r.sum(0) for r in rows) / count
    if scale == "paper":
        spread = sum((r - mean).norm(dim=-1).sum() for r in rows) / count
    else:
        spread = sum((r - mean).pow(2).sum(-1).sum() for r in rows) / count
    spread = float(spread)
    if spread <= 0:
        raise ValueError("the batches have no spread around their mean; cannot standardise them")
    return mean.float(), math.sqrt(d) / spread


# ----------------------------------------------------------------------------------------------------------------
# shared SAE behaviour
# ----------------------------------------------------------------------------------------------------------------


class _MatryoshkaTopKMixin:
    """Encode / decode / folding shared by the inference and the training class."""

    cfg: Any
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    input_mean: torch.Tensor
    input_scale: torch.Tensor

    def initialize_weights(self) -> None:
        super().initialize_weights()  # type: ignore[misc]
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        if self.cfg.standardize_input:
            # input_scale == 0 means "not estimated yet"
            self.register_buffer(
                "input_mean", torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device)
            )
            self.register_buffer("input_scale", torch.zeros((), dtype=self.dtype, device=self.device))

    # -- decoder view -------------------------------------------------------------------------------------------

    def _decoder_and_row_norms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(decoder used in the forward, its row norms or None when they are 1 by construction)."""
        return self.W_dec, self.W_dec.norm(dim=-1)

    def _topk_scores(self, z: torch.Tensor, row_norms: torch.Tensor | None) -> torch.Tensor | None:
        """Latents are ranked by their contribution size z_j ||D_j|| (= z_j for unit-norm rows)."""
        return None if row_norms is None else z * row_norms

    # -- standardisation ----------------------------------------------------------------------------------------

    def set_input_standardization(self, mean: torch.Tensor, scale: float | torch.Tensor) -> None:
        """Store mu [d_in] and the scalar s; the SAE then encodes (x - mu) * s and decodes back to raw space."""
        if not self.cfg.standardize_input:
            raise ValueError("set_input_standardization needs a config with standardize_input=True")
        mean = torch.as_tensor(mean).reshape(-1)
        if mean.shape[0] != self.cfg.d_in:
            raise ValueError(f"input mean has width {mean.shape[0]}, expected d_in={self.cfg.d_in}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"input scale must be a positive finite number, got {scale}")
        with torch.no_grad():
            self.input_mean.copy_(mean.to(self.input_mean))
            self.input_scale.fill_(scale)

    def fit_input_standardization(self, batches: Iterable[torch.Tensor], n_batches: int | None = None, **kw):
        """Estimate mu and s from ``batches`` (see ``estimate_input_standardization``) and store them."""
        if "scale" not in kw:
            kw["scale"] = getattr(self.cfg, "standardize_scale", "paper")
        mean, scale = estimate_input_standardization(batches, n_batches=n_batches, **kw)
        self.set_input_standardization(mean, scale)
        return mean, scale

    @property
    def input_standardization_is_set(self) -> bool:
        return (not self.cfg.standardize_input) or bool(self.input_scale != 0)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            got = "a scalar" if x.ndim == 0 else f"width {x.shape[-1]} (shape {tuple(x.shape)})"
            hook = self.cfg.metadata.hook_name
            where = f" at hook {hook!r}" if hook else ""
            raise ValueError(f"SAE expects inputs of width d_in={self.cfg.d_in}{where}, got {got}")

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.standardize_input:
            return x
        if not self.input_standardization_is_set:
            raise ValueError(
                "standardize_input=True but input_mean/input_scale were never set: call "
                "sae.fit_input_standardization(batches) or sae.set_input_standardization(mean, scale)"
            )
        return (x - self.input_mean) * self.input_scale

    def _unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.standardize_input:
            return x
        return x / self.input_scale + self.input_mean

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw input -> the space the dictionary works in (before b_dec is subtracted)."""
        x = x.to(self.dtype)
        x = self.reshape_fn_in(x)
        self._check_width(x)
        x = self.hook_sae_input(x)
        x = self.run_time_activation_norm_fn_in(x)
        return self._standardize(x)

    def _hidden_pre(self, x_prepared: torch.Tensor) -> torch.Tensor:
        """pre = (x - b_dec) @ W_enc + b_enc, computed as x @ W_enc + (b_enc - b_dec @ W_enc).

        Same function; the input itself needs no gradient, so backward skips a [B, d_sae] x [d_sae, d_in] matmul.
        """
        bias = self.b_enc
        if self.cfg.apply_b_dec_to_input:
            bias = bias - self.b_dec @ self.W_enc
        return self.hook_sae_acts_pre(x_prepared @ self.W_enc + bias)

    # -- public inference API -----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Latents of raw x: ReLU latents, or TopK of them at ``k`` (default ``cfg.inference_k``).

        TopK ranks latents by z_j ||D_j|| (= z_j for unit-norm decoder rows), which makes ``fold_W_dec_norm``
        exact at every k.
        """
        k = check_k(self.cfg.inference_k if k is None else k, self.cfg.d_sae)
        z = F.relu(self._hidden_pre(self._prepare_input(x)))
        if k is not None and k < self.cfg.d_sae:
            z = self._topk_latents(z, k)
        return self.hook_sae_acts_post(z)

    def _topk_latents(self, z: torch.Tensor, k: int) -> torch.Tensor:
        k = check_k(k, self.cfg.d_sae)
        _, row_norms = self._decoder_and_row_norms()
        scores = self._topk_scores(z, row_norms)
        indices = torch.topk(z if scores is None else scores, k, dim=-1).indices
        return torch.zeros_like(z).scatter(-1, indices, z.gather(-1, indices))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """x_hat = unstandardize(z @ D + b_dec), in the raw input space."""
        decoder, _ = self._decoder_and_row_norms()
        out = self.hook_sae_recons(feature_acts @ decoder + self.b_dec)
        out = self._unstandardize(out)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        feature_acts = self.encode(x, k=k)
        sae_out = self.decode(feature_acts)
        if self.use_error_term:
            with torch.no_grad():
                from sae_lens.saes.sae import _disable_hooks

                with _disable_hooks(self):
                    clean = self.decode(self.encode(x, k=k))
                sae_error = self.hook_sae_error(x - clean)
            sae_out = sae_out + sae_error
        return self.hook_sae_output(sae_out)

    @torch.no_grad()
    def reconstructions(
        self, x: torch.Tensor, ks: Sequence[int | None] | None = None
    ) -> dict[int | None, torch.Tensor]:
        """Reconstructions of raw x at several k in one pass: {k: x_hat_k}; k = None (or d_sae) is ReLU.

        One encode, one topk at the largest k, nested band decodes (see ``nested_topk_reconstructions``).
        Default ks: the training ``k_levels``. Inputs of any leading shape [..., d_in].
        """
        ks = list(self.cfg.k_levels if ks is None else ks)
        if not ks:
            raise ValueError("ks must not be empty")
        ks = [check_k(k, self.cfg.d_sae) for k in ks]
        prepared = self._prepare_input(x)
        lead_shape = prepared.shape[:-1]
        z = F.relu(self._hidden_pre(prepared.reshape(-1, self.cfg.d_in)))
        decoder, row_norms = self._decoder_and_row_norms()
        distinct = sorted({self.cfg.d_sae if k is None else k for k in ks})
        decoded = nested_topk_reconstructions(z, decoder, distinct, scores=self._topk_scores(z, row_norms))
        stacked = self._unstandardize(torch.stack(decoded) + self.b_dec)
        # one call: SAELens's run-time normalisers keep per-call state that a second call would miss
        stacked = self.run_time_activation_norm_fn_out(stacked.reshape(len(distinct), *lead_shape, -1))
        stacked = self.reshape_fn_out(stacked, self.d_head)
        by_k = dict(zip(distinct, stacked.unbind(0)))
        return {k: by_k[self.cfg.d_sae if k is None else k] for k in ks}

    # -- folding ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """The SAE was trained on c * x; make it take raw x with the same function (and ranking).

        With standardisation: mu <- mu / c, s <- s * c. Otherwise latents are scaled by 1 / c (b_enc, b_dec
        divided by c) so decoder rows keep unit norm: pre(c x) / c = (x - b_dec / c) @ W_enc + b_enc / c.
        """
        c = float(scaling_factor)
        if self.cfg.standardize_input:
            self.input_mean.div_(c)
            self.input_scale.mul_(c)
        else:
            self.b_enc.data.div_(c)
            self.b_dec.data.div_(c)
        self.cfg.normalize_activations = "none"


class _RemoveRadialGradient(torch.autograd.Function):
    """Identity on unit-norm decoder rows w whose backward drops the gradient component along w:
    g -> g - (g . w) w, the authors' radial gradient removal (= the gradient of w / ||w|| at ||w|| = 1)."""

    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return torch.addcmul(grad, torch.linalg.vecdot(grad, weight).unsqueeze(-1), weight, value=-1)


class MatryoshkaTopKSAE(_MatryoshkaTopKMixin, SAE[MatryoshkaTopKSAEConfig]):
    """Inference Matryoshka SAE: ``encode(x)`` gives ReLU latents, ``encode(x, k=64)`` TopK latents,
    ``reconstructions(x, ks=[16, 64, 256, None])`` several reconstructions at once. Takes raw activations."""

    b_enc: nn.Parameter

    def __init__(self, cfg: MatryoshkaTopKSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class MatryoshkaTopKTrainingSAE(_MatryoshkaTopKMixin, TrainingSAE[MatryoshkaTopKTrainingSAEConfig]):
    """Training Matryoshka SAE: nested TopK losses from one encoder pass (see module docstring)."""

    b_enc: nn.Parameter
    # how the level reconstructions are computed; benchmarks swap in ``naive_topk_reconstructions``
    nested_decode = staticmethod(nested_topk_reconstructions)

    def __init__(self, cfg: MatryoshkaTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.level_weights = level_weights(cfg.level_weighting, len(cfg.k_levels))
        # True right after loading saved weights: their decoder rows are already what the next step's in-place
        # renormalisation would make of the live rows (saving normalises them the same way), and normalising
        # unit rows again changes their last bits, so a resumed run would drift from an uninterrupted one
        self._decoder_rows_normalised = False

    def _decoder_and_row_norms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cfg.normalize_decoder:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True), None
        return self.W_dec, self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale W_dec rows to norm 1 in place (a no-op on the function when ``normalize_decoder``)."""
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out) -> dict[str, torch.Tensor]:
        return {}  # the method has no auxiliary loss

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self._hidden_pre(self._prepare_input(x))
        z = F.relu(hidden_pre)
        if self.cfg.inference_k is not None and self.cfg.inference_k < self.cfg.d_sae:
            z = self._topk_latents(z, self.cfg.inference_k)
        return self.hook_sae_acts_post(z), hidden_pre

    def level_losses(
        self, reconstructions: Sequence[torch.Tensor], target: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per-level loss L(x_i, x) in the dictionary's (standardised) space."""
        if self.cfg.reconstruction_loss == "nmse":
            variance = (target - target.mean(0, keepdim=True)).pow(2).sum(-1).clamp(min=1e-12)
            return [((r - target).pow(2).sum(-1) / variance).mean() for r in reconstructions]
        return [(r - target).pow(2).sum(-1).mean() for r in reconstructions]

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One encoder pass, nested level reconstructions, loss = sum_i a_i L_i (weights normalised)."""
        if self.cfg.normalize_decoder and not self._decoder_rows_normalised:
            self.set_decoder_norm_to_unit_norm()
        self._decoder_rows_normalised = False
        raw = step_input.sae_in
        if self.cfg.standardize_input and not self.input_standardization_is_set:
            warnings.warn(
                "standardize_input=True but no statistics were set; estimating input_mean/input_scale from the "
                f"first training batch ({raw.shape[0]} rows). Call sae.fit_input_standardization(batches) "
                "before training for a better estimate.",
                stacklevel=2,
            )
            self.fit_input_standardization([raw.detach()])
        target = self._prepare_input(raw)
        hidden_pre = self._hidden_pre(target)
        z = self.hook_sae_acts_post(F.relu(hidden_pre))
        if self.cfg.normalize_decoder:
            # W_dec has unit rows now, so W_dec / ||W_dec|| = W_dec; this gives the same gradient, (I - w w^T) g
            decoder, row_norms = _RemoveRadialGradient.apply(self.W_dec), None
        else:
            decoder, row_norms = self._decoder_and_row_norms()
        levels = self.cfg.k_levels
        decoded = self.nested_decode(z, decoder, levels, scores=self._topk_scores(z, row_norms))
        # levels at or above the batch's largest number of positive latents share one decode, hence one loss
        distinct = {id(y): y for y in decoded}
        recon_of = {key: self.hook_sae_recons(y + self.b_dec) for key, y in distinct.items()}
        loss_of = dict(zip(recon_of, self.level_losses(list(recon_of.values()), target)))
        recons = [recon_of[id(y)] for y in decoded]
        losses_per_level = [loss_of[id(y)] for y in decoded]
        loss = sum(w * level_loss for w, level_loss in zip(self.level_weights, losses_per_level))

        name = self.cfg.reconstruction_loss
        losses = {f"{name}_loss_k{k}": v.detach() for k, v in zip(levels, losses_per_level)}
        # what SAETrainer counts for L0 / dead latents: the latents encode() returns (ReLU by default)
        feature_acts = z.detach()
        if self.cfg.inference_k is not None and self.cfg.inference_k < self.cfg.d_sae:
            feature_acts = self._topk_latents(feature_acts, self.cfg.inference_k)
        metrics: dict[str, Any] = {}
        if step_input.is_logging_step:
            with torch.no_grad():
                total_variance = (
                    (target - target.mean(0, keepdim=True)).pow(2).sum(-1).mean().clamp(min=1e-12)
                )
                for k, r in zip(levels, recons):
                    metrics[f"fvu_k{k}"] = float((r - target).pow(2).sum(-1).mean() / total_variance)
                metrics["fraction_zero_relu"] = float((z == 0).float().mean())

        sae_out = self.run_time_activation_norm_fn_out(self._unstandardize(recons[-1]))
        return TrainStepOutput(
            sae_in=raw,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses=losses,
            metrics=metrics,
        )

    # -- folding and saving -------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if self.cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()  # the forward already divides by the norms
        else:
            super().fold_W_dec_norm()

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        if self.cfg.normalize_decoder:  # the same operation as ``set_decoder_norm_to_unit_norm``, bit for bit
            w = state_dict["W_dec"]
            state_dict["W_dec"] = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        # saved rows were normalised on saving: the next step uses them as they are (exact resume)
        self._decoder_rows_normalised = bool(self.cfg.normalize_decoder)


ARCHITECTURES = [
    (
        ARCHITECTURE_NAME,
        MatryoshkaTopKSAE,
        MatryoshkaTopKSAEConfig,
        MatryoshkaTopKTrainingSAE,
        MatryoshkaTopKTrainingSAEConfig,
    )
]
register(ARCHITECTURES)

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NAME",
    "MatryoshkaTopKSAE",
    "MatryoshkaTopKSAEConfig",
    "MatryoshkaTopKTrainingSAE",
    "MatryoshkaTopKTrainingSAEConfig",
    "default_k_levels",
    "estimate_input_standardization",
    "gather_decode",
    "level_weights",
    "naive_topk_reconstructions",
    "nested_topk_reconstructions",
    "plan_nested_decode",
    "validate_k_levels",
]
