"""Decoding nested TopK levels in one pass: the training kernel of the Matryoshka SAE (``matryoshka_topk``).

What is computed (the specification is :func:`naive_topk_reconstructions`)::

    x_i = topk_{k_i}(a) @ D          for every level k_1 < k_2 < ... < k_h

with a the [B, n] non-negative latents, D the [n, d] decoder and the top-k sets nested (one chain of ``topk``
calls). :func:`nested_reconstructions` gives the same values and gradients while sharing work between levels:

- Let p_s be the number of positive latents of row s. Every level with k >= max_s p_s equals the full decode
  a @ D, so those levels share one dense matmul (the ReLU level k = n is one of them).
- Every other ("partial") level is built by one of three plans:

  ``"below_plus_band"``   x_i = x_{i-1} + band_i, band_i = the latents of ranks k_{i-1}..k_i;
  ``"above_minus_band"``  x_i = x_{i+1} - the positive latents of ranks k_i..k_{i+1};
  ``"dense"``             x_i = (a masked to its top-k_i) @ D.

  Bands are decoded by gathering decoder rows (``F.embedding_bag``). All bands of a batch and the shared dense
  decode are one autograd Function (:class:`_GatherDecode`), whose backward adds the gathered latents'
  gradients into the dense gradient in place instead of through a dense scatter.

Which plan a level gets is decided in ONE place, :func:`_plan_levels`, by a cost model (``GATHER_COST``,
``DENSE_LEVEL_COST``). Every plan is exact (the same values and gradients up to float rounding), so the plan
only changes speed. The ``plan`` argument (the SAE config's ``decode_plan``) picks how:

- ``"gather"``: the cost model with the CPU constants above (gathered bands wherever they are cheaper); it
  reads the batch's positive-latent counts on the host, one device sync per call;
- ``"dense"``: every level below d_sae is one masked dense decode (h matmuls, no device sync at all);
- ``"auto"`` (default): ``"gather"`` on a CPU (the constants were measured there, and a fixed rule keeps
  resumed runs bit-exact); on any other device the first call at a shape times both plans on that very batch
  (forward and backward, :func:`calibrate_plan`) and the faster one is used for that device, dtype and shape
  from then on (:data:`CALIBRATED_PLANS`, one process).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

# Cost model of the nested decode (forward + backward, per batch row), in units of one latent of a dense
# masked level: a dense level costs DENSE_LEVEL_COST * d_sae (three matmuls plus the mask), one gathered
# latent GATHER_COST (gathers are memory-bound and the sampled matmul of the backward is not vectorised).
# Measured on a 2-core AVX-512 CPU with torch 2.14 (see docs/notes/issue-3.md); only the plan choice depends
# on them.
GATHER_COST = 8.0
DENSE_LEVEL_COST = 1.0
# Gathers run over column tiles of the gathered table at most this wide (0: no tiles), narrower when the table
# has many rows, so that the tile stays in a core's L2 cache (measured best on a 2 MiB-L2 AVX-512 core).
DECODE_TILE_WIDTH = 64
TILE_BYTES = 3 * 2**20

LevelPlan = Literal["below_plus_band", "above_minus_band", "dense"]
DecodePlan = Literal["auto", "gather", "dense"]
DECODE_PLANS: tuple[str, ...] = ("auto", "gather", "dense")
# "auto" off the CPU: the plan measured fastest, by (device, dtype, rows, latents, width, ks)
CALIBRATED_PLANS: dict[tuple, str] = {}


def naive_topk_reconstructions(
    acts: torch.Tensor, decoder: torch.Tensor, k_levels: Sequence[int], scores: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The specification of :func:`nested_reconstructions`: one ``topk`` and one dense decode per level.

    ``[topk_k(acts) @ decoder for k in k_levels]`` (no bias), the top-k sets ranked by ``scores`` (default:
    ``acts``). Readable and slow (h dense decodes); the tests hold the fast version to it.
    """
    ranked = acts if scores is None else scores
    outputs = []
    for k in k_levels:
        indices = torch.topk(ranked, k, dim=-1).indices
        sparse = torch.zeros_like(acts).scatter(-1, indices, acts.gather(-1, indices))
        outputs.append(sparse @ decoder)
    return outputs


def check_decode_plan(plan: str) -> str:
    if plan not in DECODE_PLANS:
        raise ValueError(f"decode_plan must be one of {', '.join(DECODE_PLANS)}, got {plan!r}")
    return plan


def nested_reconstructions(
    acts: torch.Tensor,
    decoder: torch.Tensor,
    k_levels: Sequence[int],
    scores: torch.Tensor | None = None,
    plan: DecodePlan = "auto",
) -> list[torch.Tensor]:
    """``naive_topk_reconstructions(acts, decoder, k_levels, scores)``, sharing work between the levels.

    Args:
        acts: [B, n] non-negative latents.
        decoder: [n, d] decoder rows.
        k_levels: strictly increasing ks in [1, n].
        scores: [B, n] ranking of the latents for the top-k sets (default: ``acts``).
        plan: ``"auto"``, ``"gather"`` or ``"dense"`` (module docstring).

    Returns:
        The reconstructions (no bias) of the first m levels, m <= h. Each level after them equals the last one
        returned (its k reaches every row's number of positive latents, so it is the full decode ``acts @
        decoder``), so it is not repeated: level i is ``result[min(i, len(result) - 1)]``. Differentiable in
        ``acts`` and ``decoder``.
    """
    levels = list(k_levels)
    n_rows, n_latents = acts.shape
    if n_rows == 0:
        return [acts.new_zeros(0, decoder.shape[-1])]
    if check_decode_plan(plan) == "auto":
        plan = "gather" if acts.device.type == "cpu" else calibrate_plan(acts, decoder, levels, scores)
    with torch.no_grad():
        positive = acts > 0
        if plan == "dense":  # no host sync: every level below n is decoded, even one that equals the full
            partial, counts = [k for k in levels if k < n_latents], None
        else:
            # one device sync: the positive counts decide which levels are partial and how to build them
            counts = positive.sum(-1, dtype=torch.int32).cpu()  # an int32 sum of bools is ~8x faster
            partial = [k for k in levels if k < int(counts.max())]
    if not partial:
        return [acts @ decoder]
    full_needed = len(partial) < len(levels)
    if counts is None:
        plan_of_level: list[LevelPlan] = ["dense"] * len(partial)
    else:
        plan_of_level = _plan_levels(partial, counts, n_latents, full_available=full_needed)

    with torch.no_grad():
        sets, bands = _nested_topk_sets(acts if scores is None else scores, partial, plan_of_level)

    def mask_of(k: int) -> torch.Tensor:
        return torch.zeros_like(positive).scatter_(-1, sets[k], True)

    # every gathered band (of "below_plus_band" and "above_minus_band" levels) goes through one _GatherDecode
    added = [i for i, how in enumerate(plan_of_level) if how == "below_plus_band"]
    subtracted = [i for i, how in enumerate(plan_of_level) if how == "above_minus_band"]
    rows, cols, sizes = [], [], []
    with torch.no_grad():
        if added:
            added_cols = torch.cat([bands[i] for i in added], dim=-1)
            cols.append(added_cols.reshape(-1))
            rows.append(torch.arange(n_rows, device=acts.device).repeat_interleave(added_cols.shape[1]))
            bounds = [0] + partial
            widths = [bounds[i + 1] - bounds[i] for i in added]
            sizes.append(torch.tensor(widths, device=acts.device).repeat(n_rows))
        for i in subtracted:  # positive latents ranked between k_i and the next level (or all positives)
            in_upper = mask_of(partial[i + 1]) & positive if i + 1 < len(partial) else positive
            band_rows, band_cols = (in_upper & ~mask_of(partial[i])).nonzero(as_tuple=True)
            rows.append(band_rows)
            cols.append(band_cols)
            sizes.append(torch.bincount(band_rows, minlength=n_rows))
    if rows:
        with torch.no_grad():
            flat_rows, flat_cols, bag_sizes = torch.cat(rows), torch.cat(cols), torch.cat(sizes)
            offsets = torch.cat([bag_sizes.new_zeros(1), bag_sizes.cumsum(0)[:-1]])
        positions = flat_rows * n_latents + flat_cols
        full, out = _gather_decode_autocast(acts, decoder, positions, flat_cols, offsets, full_needed)
        d = decoder.shape[-1]
        added_out, subtracted_out = out.split([n_rows * len(added), n_rows * len(subtracted)])
        decoded = list(added_out.view(n_rows, len(added), d).unbind(1))
        decoded += list(subtracted_out.view(len(subtracted), n_rows, d).unbind(0))
    else:
        full, decoded = (acts @ decoder if full_needed else None), []
    decoded_band = dict(zip(added + subtracted, decoded))

    outputs: dict[int, torch.Tensor] = {}
    for i, k in enumerate(partial):  # bottom-up: levels built from the one below, and dense levels
        if plan_of_level[i] == "below_plus_band":
            outputs[k] = decoded_band[i] if i == 0 else outputs[partial[i - 1]] + decoded_band[i]
        elif plan_of_level[i] == "dense":
            outputs[k] = (acts * mask_of(k)) @ decoder
    for i in reversed(subtracted):  # top-down: levels built from the one above
        upper = outputs[partial[i + 1]] if i + 1 < len(partial) else full
        outputs[partial[i]] = upper - decoded_band[i]
    return [outputs[k] for k in partial] + ([full] if full_needed else [])


def calibrate_plan(
    acts: torch.Tensor,
    decoder: torch.Tensor,
    k_levels: Sequence[int],
    scores: torch.Tensor | None = None,
    repeats: int = 3,
) -> str:
    """The faster of ``"gather"`` and ``"dense"`` for this device, dtype and shape, timed on this batch.

    Each plan runs a forward and a backward (on detached copies, so the caller's graph is untouched) once to
    warm up, then ``repeats`` times; the median decides. Cached in :data:`CALIBRATED_PLANS`, so the cost is
    paid once per shape (a few decodes: well under a second at the paper's sizes on a GPU).
    """
    key = (str(acts.device), acts.dtype, *acts.shape, decoder.shape[-1], tuple(k_levels))
    if key not in CALIBRATED_PLANS:
        seconds = {p: _time_plan(p, acts, decoder, k_levels, scores, repeats) for p in ("gather", "dense")}
        CALIBRATED_PLANS[key] = min(seconds, key=seconds.__getitem__)
    return CALIBRATED_PLANS[key]


def _time_plan(plan, acts, decoder, k_levels, scores, repeats) -> float:
    acts = acts.detach().requires_grad_(True)
    decoder = decoder.detach().requires_grad_(True)
    scores = None if scores is None else scores.detach()
    times = []
    with torch.enable_grad():  # also when the caller decodes under no_grad (inference)
        for _ in range(repeats + 1):
            _synchronize(acts.device)
            start = time.perf_counter()
            outputs = nested_reconstructions(acts, decoder, k_levels, scores, plan=plan)
            torch.stack([y.sum() for y in outputs]).sum().backward()
            _synchronize(acts.device)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plan_levels(
    partial: Sequence[int], counts: torch.Tensor, n: int, full_available: bool
) -> list[LevelPlan]:
    """The cheapest plan per partial level under the cost model (``GATHER_COST``, ``DENSE_LEVEL_COST``).

    Costs per batch row: "below_plus_band" = GATHER_COST * band width; "above_minus_band" = GATHER_COST *
    mean number of positive latents between the level and the next one (or all positives, above the last
    partial level, when the full decode is there); "dense" = DENSE_LEVEL_COST * n. An "above_minus_band" level
    needs the level above it finished first and a "below_plus_band" level the one below, so an
    "above_minus_band" level directly below a "below_plus_band" one is not allowed. A dynamic programme over
    the levels picks the plan.
    """
    m = len(partial)
    counts_f = counts.double()
    cost: list[dict[LevelPlan, float]] = []
    for i, k in enumerate(partial):
        options: dict[LevelPlan, float] = {
            "dense": DENSE_LEVEL_COST * n,
            "below_plus_band": GATHER_COST * (k - (partial[i - 1] if i else 0)),
        }
        if i + 1 < m or full_available:
            upper = partial[i + 1] if i + 1 < m else n
            options["above_minus_band"] = GATHER_COST * float((counts_f - k).clamp(0, upper - k).mean())
        cost.append(options)
    # best[how] = (cost, plan of the levels so far) over plans whose last level is built by ``how``
    best: dict[LevelPlan, tuple[float, list[LevelPlan]]] = {how: (c, [how]) for how, c in cost[0].items()}
    for i in range(1, m):
        new: dict[LevelPlan, tuple[float, list[LevelPlan]]] = {}
        for how, c in cost[i].items():
            candidates = [
                (prev_cost + c, path + [how])
                for prev_how, (prev_cost, path) in best.items()
                if not (prev_how == "above_minus_band" and how == "below_plus_band")
            ]
            if candidates:
                new[how] = min(candidates, key=lambda t: t[0])
        best = new
    return min(best.values(), key=lambda t: t[0])[1]


def _nested_topk_sets(
    ranked: torch.Tensor, partial: Sequence[int], plan: Sequence[LevelPlan]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Index sets {k: [B, k]} of the top-k of ``ranked`` for the sizes the plan needs, and the bands
    {i: [B, k_i - k_{i-1}]} (latents of ranks k_{i-1}..k_i) of its "below_plus_band" levels.

    One chain of unsorted ``topk`` calls, largest k first, each on the previous result (so the sets are nested
    and only the first call sees all latents); a level's band is what the next call leaves out.
    """
    needed = set()
    for i, how in enumerate(plan):
        needed.add(partial[i])
        if how == "below_plus_band" and i > 0:
            needed.add(partial[i - 1])
        if how == "above_minus_band" and i + 1 < len(partial):
            needed.add(partial[i + 1])
    level_of_band = {partial[i]: i for i, how in enumerate(plan) if how == "below_plus_band"}
    sets: dict[int, torch.Tensor] = {}
    bands: dict[int, torch.Tensor] = {}
    values, indices, previous = ranked, None, None
    for k in sorted(needed, reverse=True):
        values, local = torch.topk(values, k, dim=-1, sorted=False)
        if indices is not None and previous in level_of_band:  # the band of the previous (larger) size
            left_out = torch.ones_like(indices, dtype=torch.bool).scatter_(-1, local, False)
            bands[level_of_band[previous]] = indices[left_out].view(indices.shape[0], -1)
        indices = local if indices is None else indices.gather(-1, local)
        sets[k], previous = indices, k
    if 0 in level_of_band.values():
        bands[0] = sets[partial[0]]
    return sets, bands


def _gather_decode(
    weights: torch.Tensor, decoder: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """out[b] = sum_{e in bag b} weights[e] * decoder[indices[e]]; bag b: entries offsets[b]..offsets[b+1].

    Same values as ``F.embedding_bag(indices, decoder, offsets, per_sample_weights=weights, mode="sum")`` with
    a faster backward: the decoder gradient is one gather over the entries sorted by latent (instead of a
    scatter), the weight gradient one sampled matmul. All three work on column tiles of the table they gather
    from, so the rows they touch stay in cache. (The band decode of :class:`_GatherDecode` on its own.)
    """
    positions = torch.arange(weights.shape[0], device=weights.device)
    return _GatherDecode.apply(weights, decoder, positions, indices, offsets, False)[1]


def _gather_decode_autocast(acts, decoder, positions, indices, offsets, with_full):
    """:class:`_GatherDecode` under autocast: its matmuls and bag sums run in the autocast dtype (bf16 in a
    SAELens mixed-precision step) on inputs cast to it before the Function, so the casts' own backward
    returns float32 gradients to float32 weights; the Function itself never sees mixed dtypes."""
    device_type = acts.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _GatherDecode.apply(
                acts.to(dtype), decoder.to(dtype), positions, indices, offsets, with_full
            )
    if acts.dtype != decoder.dtype:
        dtype = torch.promote_types(acts.dtype, decoder.dtype)
        acts, decoder = acts.to(dtype), decoder.to(dtype)
    return _GatherDecode.apply(acts, decoder, positions, indices, offsets, with_full)


def _tile_width(table: torch.Tensor) -> int:
    """Widest power-of-two tile up to DECODE_TILE_WIDTH whose rows fit in TILE_BYTES (table width if 0)."""
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
            # sampled_addmm takes float32 / float64 only: bf16 / fp16 products accumulate in float32
            dot_dtype = weights.dtype if weights.dtype in (torch.float32, torch.float64) else torch.float32
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                dots = torch.sparse_csr_tensor(
                    crow,
                    indices,
                    weights.new_zeros(n_entries, dtype=dot_dtype),
                    (n_bags, n_latents),
                    check_invariants=False,
                )
                for g, d in zip(grad_tiles, decoder_tiles):  # accumulate in place: no copy of the pattern
                    torch.sparse.sampled_addmm(dots, g.to(dot_dtype), d.t().to(dot_dtype), beta=1.0, out=dots)
            if grad_acts is None:
                grad_acts = torch.zeros_like(acts)
            grad_acts.view(-1).index_add_(0, positions, dots.values().to(acts.dtype))
        if need_decoder:
            # grad_decoder[j] = sum_{e: indices[e] = j} weights[e] * grad_bands[bag(e)]: a bag sum per latent;
            # sorting the narrowest integer type that holds the latent ids is the cheapest (int16: 2x int32)
            key_dtype = (
                torch.int16 if n_latents <= 2**15 else torch.int32 if n_latents <= 2**31 else torch.int64
            )
            order = torch.sort(indices.to(key_dtype), stable=True).indices
            bag_sizes = torch.diff(offsets, append=offsets.new_tensor([n_entries]))
            bag_of_entry = torch.repeat_interleave(torch.arange(n_bags, device=offsets.device), bag_sizes)
            per_latent = torch.bincount(indices, minlength=n_latents)
            latent_offsets = torch.cat([per_latent.new_zeros(1), per_latent.cumsum(0)[:-1]])
            sorted_bags, sorted_weights = bag_of_entry.index_select(0, order), weights.index_select(0, order)
            band_grad = _tiled_bag_sum(sorted_bags, grad_tiles, latent_offsets, sorted_weights)
            grad_decoder = band_grad if grad_decoder is None else grad_decoder.add_(band_grad)
        return grad_acts, grad_decoder, None, None, None, None


__all__ = [
    "DECODE_PLANS",
    "calibrate_plan",
    "check_decode_plan",
    "naive_topk_reconstructions",
    "nested_reconstructions",
]
