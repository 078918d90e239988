"""Matryoshka SAE with nested TopK levels (MSAE), architecture ``matryoshka_topk``.

Zaigrajew, Baniecki & Biecek, "Interpreting CLIP with Hierarchical Sparse Autoencoders", ICML 2025
(arXiv 2502.20578). One encoder and one dictionary D (rows D_j). Several TopK operators with increasing k act
on the SAME latents, so their supports are nested::

    x~     = (x - mu) * s                          input standardisation (optional; mu, s kept as buffers)
    z      = ReLU((x~ - b_pre) W_enc + b_enc)      the inference latents (b_pre is SAELens's b_dec)
    z_i    = TopK_{k_i}(z),  k_1 < k_2 < ... < k_h  supp z_1 within supp z_2 within ... (k = d_sae: z itself)
    x^_i   = z_i D + b_pre

The MSAE loss is the weighted mean of the level losses::

    L = sum_i a_i L(x^_i, x~) / sum_i a_i
    uniform weighting (UW):  a_i = 1
    reverse weighting (RW):  a_i = h - i + 1       (the sparsest level weighs most)

with L the squared error summed over d and averaged over the batch (the paper's equation, ``"mse"``) or the
normalised MSE of the authors' code (``"nmse"``). No L1 term, no auxiliary loss, no resampling. Inference
uses z (ReLU) or TopK of z at any k, without retraining. This is not SAELens's ``matryoshka_batchtopk``
(Bussmann et al.: nested dictionary prefixes).

Decoder rows: with ``normalize_decoder`` the training SAE decodes with D = W_dec / ||W_dec|| (row-wise) and
renormalises W_dec in place at the start of every training step. SAELens's ``SAETrainer`` has no hook around
the optimiser step, so this parametrisation is the extension point: at ||w|| = 1 the gradient of w / ||w|| is
(I - w w^T) g, the authors' "remove the gradient component parallel to each decoder row", and the in-place
renormalisation after each step changes nothing in the function. Saved weights hold the unit-norm rows.

Input standardisation: mu = E[x] and s = sqrt(d) / E||x - mu|| (``"mean_norm"``: the mean norm of x~ becomes
sqrt(d), the paper's target) or s = sqrt(d) / E||x - mu||^2 (``"mean_squared_norm"``: what the authors' code
does). The SAE takes and returns raw activations.

The training forward makes one encoder pass and decodes all levels at once with
:func:`sae_vision_ext.saes.nested_decode.nested_reconstructions` (exactly the h independent decodes, cheaper).
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
from typing_extensions import override

from sae_vision_ext._saelens_compat import sae_hooks_disabled
from sae_vision_ext.saes import register
from sae_vision_ext.saes.nested_decode import DecodePlan, check_decode_plan, nested_reconstructions

ARCHITECTURE_NAME = "matryoshka_topk"

# How the input scale s is estimated: the statistic of ||x - mu|| that sqrt(d) is divided by.
StandardizeScale = Literal["mean_norm", "mean_squared_norm"]
STANDARDIZE_SCALES: tuple[str, ...] = ("mean_norm", "mean_squared_norm")
# The spellings used before issue 15 ("paper" / "authors_code"); saved training configs hold them.
LEGACY_STANDARDIZE_SCALES = {"paper": "mean_norm", "authors_code": "mean_squared_norm"}


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
    """Normalise ``level_weighting``: "uniform", "reverse" or explicit weights (list, "1,2,3", "[1,2,3]")."""
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
        "level_weighting must be 'uniform', 'reverse' or a list of non-negative weights, "
        f"got {level_weighting!r}"
    )


def level_weights(level_weighting: str | Sequence[float], n_levels: int) -> list[float]:
    """Weights a_i normalised to sum to 1: uniform a_i = 1, reverse a_i = h - i + 1 (i = 1..h) or explicit."""
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


def standardize_scale_name(scale: str) -> StandardizeScale:
    """``scale`` as one of ``STANDARDIZE_SCALES``; old spellings map through ``LEGACY_STANDARDIZE_SCALES``."""
    scale = LEGACY_STANDARDIZE_SCALES.get(scale, scale)
    if scale not in STANDARDIZE_SCALES:
        raise ValueError(
            f"standardize_scale must be 'mean_norm' (s = sqrt(d) / E||x - mu||, the paper) or "
            f"'mean_squared_norm' (s = sqrt(d) / E||x - mu||^2, the authors' code), got {scale!r}"
        )
    return scale  # type: ignore[return-value]


def _validate_common(cfg: MatryoshkaTopKSAEConfig | MatryoshkaTopKTrainingSAEConfig) -> None:
    if cfg.d_in < 1 or cfg.d_sae < 1:
        raise ValueError(f"d_in and d_sae must be positive, got d_in={cfg.d_in}, d_sae={cfg.d_sae}")
    if cfg.k_levels is None:
        cfg.k_levels = default_k_levels(cfg.d_sae)
    cfg.k_levels = validate_k_levels(cfg.k_levels, cfg.d_sae)
    cfg.inference_k = check_k(cfg.inference_k, cfg.d_sae, "inference_k")
    check_decode_plan(cfg.decode_plan)


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
        decode_plan: how the nested levels are decoded: "auto" (default: per device, measured), "gather" or
            "dense"; every plan gives the same values (``sae_vision_ext.saes.nested_decode``).
    """

    k_levels: list[int] | None = None
    inference_k: int | None = None
    standardize_input: bool = False
    decode_plan: DecodePlan = "auto"

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE_NAME

    @override
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
            "nmse" (the authors' code: per sample sum_d (x_hat - x)^2 / sum_d (x - mu)^2, averaged over the
            batch; mu is the dataset mean with ``standardize_input``, else the batch mean).
        normalize_decoder: decode with unit-norm decoder rows and drop the radial gradient component.
        inference_k, standardize_input: see ``MatryoshkaTopKSAEConfig``.
        standardize_scale: how the input scale is estimated: "mean_norm" s = sqrt(d) / E||x - mu|| (the
            paper: the mean norm becomes sqrt(d)) or "mean_squared_norm" s = sqrt(d) / E||x - mu||^2 (the
            authors' code). The old spellings "paper" and "authors_code" are read as these two.
        decoder_init_norm: tied initialisation W_enc = W_dec^T with rows of this norm (0.1).
        decode_plan: see ``MatryoshkaTopKSAEConfig``; set "gather" or "dense" for bit-exact resumes on a GPU
            ("auto" measures the plans again in a new process and may pick the other one).
    """

    k_levels: list[int] | None = None
    level_weighting: str | list[float] = "uniform"
    reconstruction_loss: Literal["mse", "nmse"] = "mse"
    normalize_decoder: bool = True
    inference_k: int | None = None
    standardize_input: bool = False
    standardize_scale: StandardizeScale = "mean_norm"
    decode_plan: DecodePlan = "auto"

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE_NAME

    @override
    def __post_init__(self):
        _validate_common(self)
        self.level_weighting = parse_level_weighting(self.level_weighting)
        level_weights(self.level_weighting, len(self.k_levels))  # validates explicit weights
        if self.reconstruction_loss not in ("mse", "nmse"):
            raise ValueError(f"reconstruction_loss must be 'mse' or 'nmse', got {self.reconstruction_loss!r}")
        self.standardize_scale = standardize_scale_name(self.standardize_scale)
        if self.normalize_decoder and self.normalize_activations == "covariance_whitening":
            raise ValueError(
                "normalize_activations='covariance_whitening' cannot be folded into a unit-norm decoder; "
                "use normalize_decoder=False or another normalisation"
            )
        super().__post_init__()

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return MatryoshkaTopKSAEConfig


@torch.no_grad()
def estimate_input_standardization(
    batches: Iterable[torch.Tensor],
    n_batches: int | None = None,
    scale: StandardizeScale = "mean_norm",
) -> tuple[torch.Tensor, float]:
    """Estimate (mu, s) for x -> (x - mu) * s from batches of rows [B, d] (the first ``n_batches`` of them).

    mu = E[x]; "mean_norm": s = sqrt(d) / E||x - mu|| (mean norm of the standardised rows becomes sqrt(d), the
    paper); "mean_squared_norm": s = sqrt(d) / E||x - mu||^2 (the authors' code, no square root in the
    denominator). Exact two-pass estimate over the batches (they are held in memory).
    """
    scale = standardize_scale_name(scale)
    rows = [b.reshape(-1, b.shape[-1]).double() for b in islice(iter(batches), n_batches)]
    rows = [r for r in rows if r.shape[0] > 0]
    if not rows:
        raise ValueError("estimate_input_standardization needs at least one non-empty batch")
    d = rows[0].shape[-1]
    count = sum(r.shape[0] for r in rows)
    mean = sum(r.sum(0) for r in rows) / count
    if scale == "mean_norm":
        spread = sum((r - mean).norm(dim=-1).sum() for r in rows) / count
    else:
        spread = sum((r - mean).pow(2).sum(-1).sum() for r in rows) / count
    spread = float(spread)
    if spread <= 0:
        raise ValueError("the batches have no spread around their mean; cannot standardise them")
    return mean.float(), math.sqrt(d) / spread


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


def _per_level(values: list[torch.Tensor], n_levels: int) -> list[torch.Tensor]:
    """Values for the distinct reconstructions of ``nested_reconstructions``, repeated for shared levels."""
    return values + [values[-1]] * (n_levels - len(values))


class _MatryoshkaTopKBase(SAE[Any]):
    """Encode / decode / standardisation / folding shared by the inference and the training class."""

    b_enc: nn.Parameter
    input_mean: torch.Tensor
    input_scale: torch.Tensor

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        if self.cfg.standardize_input:
            # input_scale == 0 means "not estimated yet"
            self.register_buffer(
                "input_mean", torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device)
            )
            self.register_buffer("input_scale", torch.zeros((), dtype=self.dtype, device=self.device))

    # -- decoder view ----------------------------------------------------------------------------------------

    def _decoder_and_row_norms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(decoder used in the forward, its row norms or None when they are 1 by construction)."""
        return self.W_dec, self.W_dec.norm(dim=-1)

    def _topk_scores(self, z: torch.Tensor, row_norms: torch.Tensor | None) -> torch.Tensor | None:
        """Latents are ranked by their contribution size z_j ||D_j|| (= z_j for unit-norm rows)."""
        return None if row_norms is None else z * row_norms

    # -- standardisation -------------------------------------------------------------------------------------

    def set_input_standardization(self, mean: torch.Tensor, scale: float | torch.Tensor) -> None:
        """Store mu [d_in] and the scalar s; the SAE then encodes (x - mu) * s and decodes back to raw x."""
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

    def fit_input_standardization(
        self,
        batches: Iterable[torch.Tensor],
        n_batches: int | None = None,
        scale: StandardizeScale | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Estimate mu and s from ``batches`` (see ``estimate_input_standardization``) and store them.

        ``scale`` defaults to the config's ``standardize_scale`` (inference configs: "mean_norm").
        """
        if scale is None:
            scale = getattr(self.cfg, "standardize_scale", "mean_norm")
        mean, s = estimate_input_standardization(batches, n_batches=n_batches, scale=scale)
        self.set_input_standardization(mean, s)
        return mean, s

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

        Same function; the input needs no gradient, so backward skips a [B, d_sae] x [d_sae, d_in] matmul.
        """
        bias = self.b_enc
        if self.cfg.apply_b_dec_to_input:
            bias = bias - self.b_dec @ self.W_enc
        return self.hook_sae_acts_pre(x_prepared @ self.W_enc + bias)

    # -- public inference API --------------------------------------------------------------------------------

    @override
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

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """x_hat = unstandardize(z @ D + b_dec), in the raw input space."""
        decoder, _ = self._decoder_and_row_norms()
        out = self.hook_sae_recons(feature_acts @ decoder + self.b_dec)
        out = self._unstandardize(out)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    @override
    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """SAELens's forward (``use_error_term`` included), with the TopK ``k`` of ``encode``."""
        feature_acts = self.encode(x, k=k)
        sae_out = self.decode(feature_acts)
        if self.use_error_term:
            with torch.no_grad():
                with sae_hooks_disabled(self):
                    clean = self.decode(self.encode(x, k=k))
                sae_error = self.hook_sae_error(x - clean)
            sae_out = sae_out + sae_error
        return self.hook_sae_output(sae_out)

    @torch.no_grad()
    def reconstructions(
        self, x: torch.Tensor, ks: Sequence[int | None] | None = None
    ) -> dict[int | None, torch.Tensor]:
        """Reconstructions of raw x at several k in one pass: {k: x_hat_k}; k = None (or d_sae) is ReLU.

        One encode and one nested decode (see ``nested_reconstructions``). Default ks: the training
        ``k_levels``. Inputs of any leading shape [..., d_in].
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
        scores = self._topk_scores(z, row_norms)
        decoded = nested_reconstructions(z, decoder, distinct, scores=scores, plan=self.cfg.decode_plan)
        decoded = _per_level(decoded, len(distinct))
        stacked = self._unstandardize(torch.stack(decoded) + self.b_dec)
        # one call: SAELens's run-time normalisers keep per-call state that a second call would miss
        stacked = self.run_time_activation_norm_fn_out(stacked.reshape(len(distinct), *lead_shape, -1))
        stacked = self.reshape_fn_out(stacked, self.d_head)
        by_k = dict(zip(distinct, stacked.unbind(0)))
        return {k: by_k[self.cfg.d_sae if k is None else k] for k in ks}

    # -- folding ---------------------------------------------------------------------------------------------

    @override
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


class MatryoshkaTopKSAE(_MatryoshkaTopKBase, SAE[MatryoshkaTopKSAEConfig]):
    """Inference Matryoshka SAE: ``encode(x)`` gives ReLU latents, ``encode(x, k=64)`` TopK latents,
    ``reconstructions(x, ks=[16, 64, 256, None])`` several reconstructions at once. Takes raw activations."""

    def __init__(self, cfg: MatryoshkaTopKSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class MatryoshkaTopKTrainingSAE(_MatryoshkaTopKBase, TrainingSAE[MatryoshkaTopKTrainingSAEConfig]):
    """Training Matryoshka SAE: nested TopK losses from one encoder pass (see the module docstring)."""

    def __init__(self, cfg: MatryoshkaTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.level_weights = level_weights(cfg.level_weighting, len(cfg.k_levels))
        # True right after loading saved weights: their decoder rows are already what the next step's in-place
        # renormalisation would make of the live rows (saving normalises them the same way), and normalising
        # unit rows again changes their last bits, so a resumed run would drift from an uninterrupted one
        self._decoder_rows_normalised = False

    @override
    def _decoder_and_row_norms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cfg.normalize_decoder:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True), None
        return self.W_dec, self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale W_dec rows to norm 1 in place (a no-op on the function when ``normalize_decoder``)."""
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    @override
    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out) -> dict[str, torch.Tensor]:
        return {}  # the method has no auxiliary loss

    @override
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
            # the authors divide by each row's squared distance to the dataset mean: with standardize_input
            # the target is already centred on it; without, the batch mean is the best estimate at hand
            centre = 0.0 if self.cfg.standardize_input else target.mean(0, keepdim=True)
            variance = (target - centre).pow(2).sum(-1).clamp(min=1e-12)
            return [((r - target).pow(2).sum(-1) / variance).mean() for r in reconstructions]
        return [(r - target).pow(2).sum(-1).mean() for r in reconstructions]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One encoder pass, nested level reconstructions, loss = sum_i a_i L_i (weights normalised)."""
        if self.cfg.normalize_decoder and not self._decoder_rows_normalised:
            self.set_decoder_norm_to_unit_norm()
        self._decoder_rows_normalised = False
        raw = step_input.sae_in
        if self.cfg.standardize_input and not self.input_standardization_is_set:
            warnings.warn(
                "standardize_input=True but no statistics were set; estimating input_mean/input_scale from "
                f"the first training batch ({raw.shape[0]} rows). Call "
                "sae.fit_input_standardization(batches) before training for a better estimate.",
                stacklevel=2,
            )
            self.fit_input_standardization([raw.detach()])
        target = self._prepare_input(raw)
        hidden_pre = self._hidden_pre(target)
        z = self.hook_sae_acts_post(F.relu(hidden_pre))
        if self.cfg.normalize_decoder:
            # W_dec has unit rows now, so W_dec / ||W_dec|| = W_dec; this gives its gradient, (I - w w^T) g
            decoder, row_norms = _RemoveRadialGradient.apply(self.W_dec), None
        else:
            decoder, row_norms = self._decoder_and_row_norms()
        levels = self.cfg.k_levels
        # the levels at or above the batch's largest number of positive latents share one decode: the
        # decode returns it once, so its loss is computed once
        scores = self._topk_scores(z, row_norms)
        decoded = nested_reconstructions(z, decoder, levels, scores=scores, plan=self.cfg.decode_plan)
        distinct_recons = [self.hook_sae_recons(y + self.b_dec) for y in decoded]
        recons = _per_level(distinct_recons, len(levels))
        losses_per_level = _per_level(self.level_losses(distinct_recons, target), len(levels))
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

    # -- folding and saving ----------------------------------------------------------------------------------

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if self.cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()  # the forward already divides by the norms
        else:
            super().fold_W_dec_norm()

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        if self.cfg.normalize_decoder:  # the same operation as ``set_decoder_norm_to_unit_norm``, bit for bit
            w = state_dict["W_dec"]
            state_dict["W_dec"] = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    @override
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
    "StandardizeScale",
    "default_k_levels",
    "estimate_input_standardization",
    "level_weights",
    "validate_k_levels",
]
