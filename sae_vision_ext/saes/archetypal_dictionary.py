"""The archetypal dictionary of A-SAE / RA-SAE (Fel et al., "Archetypal SAE", ICML 2025, arXiv 2502.12892).

One row per atom::

    D = W C + Lambda                                                         [d_sae, d_in]

    C       [n', d_in]      fixed candidates (k-means centroids of the activations)    buffer ``C``
    W       [d_sae, n']     row-stochastic:  W_ij >= 0,  sum_j W_ij = 1                  parameter ``W``
    Lambda  [d_sae, d_in]   relaxation:      ||Lambda_i||_2 <= delta                      parameter ``Lambda``

delta = 0 is A-SAE: no Lambda parameter, every atom lies in conv(C). delta > 0 is RA-SAE. Two factors that
are 1 unless asked for scale D: exp(m), the reference code's learnable global scale (``learn_scale``; the
paper has none), and a fixed per-atom scale a (buffer ``atom_scale``) that only the SAE's folds change, which
keeps them exact::

    D = exp(m) diag(a) (W C + Lambda)

How W is parametrised and moved by the optimizer (``mixing``; SAELens's ``SAETrainer`` runs ONE Adam over
all parameters with one learning rate lr, and Adam moves every entry of a parameter by about lr per step
whatever the size of its gradient -- it divides by the gradient's running RMS). With s = ``mixing_lr_scale``:

- ``"adam"`` (the reference code, ``overcomplete``): the parameter is W itself, projected after each
  optimizer step. Every entry of W moves by ~lr per step, so one step at lr = 1e-3 on n' = 1,024
  candidates shifts ~n' lr / 2 ~ 0.5 of a one-hot row's mass onto other candidates: W stops being sparse
  (archetypal) at once. s must be 1.
- ``"scaled"``: the parameter is P with W = s P (Adam on P: P moves ~lr, W ~s lr per step; gradients reach P
  as s dL/dW, which Adam's normalisation cancels). Projection keeps s P row-stochastic:
  ``P_i <- relu(P_i) / (s sum_j relu(P_ij))``. s = 1 is ``"adam"`` exactly; s ~ 1/n' gives W entries a step
  commensurate with their uniform value 1/n'.
- ``"softmax"``: the parameter is a logit matrix L with W_i = softmax(s L_i) (row-wise). W is row-stochastic
  by construction (no projection of W). Adam moves s L by ~s lr per step, so each entry of W changes by a
  FACTOR exp(+-s lr) per step (a multiplicative / exponentiated-gradient-like update): near-zero entries stay
  near zero and a row stays concentrated unless the gradient keeps pushing it. Rows start near one-hot:
  L_ij = m / s on the initial candidate, 0 elsewhere, with m = log(p0 (n' - 1) / (1 - p0)) so the row max
  is p0 = ``SOFTMAX_INIT_ROW_MAX`` (0.99); a row with no initial candidate (d_sae > n') starts uniform.

``W`` is always the effective, row-stochastic matrix (a property for "scaled" / "softmax");
``mixing_parameter`` is the tensor the optimizer steps.

Constraints are kept by projecting the parameters onto their feasible sets, in place::

    W_i      <- relu(W_i) / sum_j relu(W_ij)          (a row with no positive entry becomes uniform 1/n')
    Lambda_i <- Lambda_i * min(1, delta / ||Lambda_i||)

Where the projection runs: inside :class:`ArchetypalDictionary`, never on an optimizer. Before each use of
its parameters -- computing D for a training step, computing the inference cache, writing its
``state_dict`` -- the dictionary projects them if they may have changed since it last did: W or Lambda was
written in place (their version counters moved: optimizer steps, manual edits), or a forward pass has
computed a differentiable D since (an optimizer step may have followed it, and PyTorch's fused Adam writes
without moving version counters). Under any trainer (SAELens's ``SAETrainer`` and its config-driven
runners, the plugin's runner, a hand-written loop with any torch optimizer) the projection therefore runs
once after each optimizer step: at the start of the next training forward pass (the reference code,
``overcomplete``, also projects at the start of each training forward), or earlier when the weights are
first read for saving, folding or inference. Saved and evaluated weights always satisfy the constraints.
Weights as built (one-hot rows of W, Lambda = 0) and as loaded by ``load_state_dict`` are used as they are.
Between an optimizer step and the next use, the raw ``W`` / ``Lambda`` may lie off their sets: read them
through ``state_dict()`` or after :meth:`ArchetypalDictionary.ensure_projected_`.

(A per-optimizer ``register_step_post_hook`` would need the code that builds the optimizer, and SAELens's
trainer and runners build their own; a process-wide optimizer hook reaches every optimizer in the process.)

Cost: D costs 2 d_sae n' d_in FLOPs forward and as much backward; the projection is elementwise on W
(d_sae n'). Outside training D is cached without a graph; the cache key holds identity, storage and version
counter of every tensor D depends on, so optimizer steps, ``load_state_dict``, ``.to()`` and folds
invalidate it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

DictionaryInit = Literal["identity", "random_candidates"]
MixingUpdate = Literal["adam", "scaled", "softmax"]
MIXING_UPDATES: tuple[str, ...] = ("adam", "scaled", "softmax")
SOFTMAX_INIT_ROW_MAX = 0.99  # "softmax": initial weight of each row's candidate
_MIXING_PARAMETER_NAMES = {"adam": "W", "scaled": "W_scaled", "softmax": "W_logits"}


# ------------------------------------------------------------------------------------------------ helpers
def validate_candidates(candidates: torch.Tensor, d_in: int) -> None:
    """Raise a clear error for candidates that are not a finite, non-empty [n', d_in] matrix."""
    if not isinstance(candidates, torch.Tensor):
        raise TypeError(f"candidates must be a torch.Tensor, got {type(candidates).__name__}")
    if candidates.ndim != 2:
        raise ValueError(
            f"candidates must be a 2-D [n_candidates, d_in] matrix, got shape {tuple(candidates.shape)}"
        )
    if candidates.shape[0] == 0:
        raise ValueError("zero candidates: the archetypal dictionary needs at least one candidate point")
    if candidates.shape[1] != d_in:
        raise ValueError(f"candidates have width {candidates.shape[1]} but the SAE's d_in is {d_in}")
    if candidates.device.type != "meta":
        finite = torch.isfinite(candidates)
        if not bool(finite.all()):
            bad_rows = (~finite).any(dim=1).nonzero().flatten()
            raise ValueError(
                f"candidates contain NaN/inf in {bad_rows.numel()} row(s), first rows {bad_rows[:5].tolist()}"
            )


def validate_delta(delta: float) -> None:
    """Raise unless delta (the bound on each ||Lambda_i||) is a finite number >= 0."""
    if (
        not isinstance(delta, (int, float))
        or isinstance(delta, bool)
        or not math.isfinite(delta)
        or delta < 0
    ):
        raise ValueError(
            f"delta (the bound on each ||Lambda_i||) must be a finite number >= 0, got {delta!r}"
        )


def initial_mixing_matrix(
    d_sae: int,
    n_candidates: int,
    init: DictionaryInit = "identity",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Initial W [d_sae, n']: one-hot rows, so atom i starts exactly at one candidate.

    ``identity``: atom i = candidate i (the paper / reference code). ``random_candidates``: atom i = a
    candidate drawn without replacement with ``seed`` (a seedable start for fair stability measurements).
    When d_sae > n' the atoms beyond n' start at zero (rows of zeros) and a warning is issued.
    """
    if n_candidates < 1:
        raise ValueError("zero candidates: the archetypal dictionary needs at least one candidate point")
    if d_sae > n_candidates:
        warnings.warn(
            f"d_sae ({d_sae}) exceeds the number of candidates ({n_candidates}): atoms {n_candidates}.."
            f"{d_sae - 1} start at zero. Use at least d_sae candidates (the paper uses 32,000).",
            UserWarning,
            stacklevel=3,
        )
    W = torch.zeros(d_sae, n_candidates, dtype=dtype, device=device)
    m = min(d_sae, n_candidates)
    if init == "identity":
        cols = torch.arange(m)
    elif init == "random_candidates":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cols = torch.randperm(n_candidates, generator=gen)[:m]
    else:
        raise ValueError(f"dictionary_init must be 'identity' or 'random_candidates', got {init!r}")
    if W.device.type != "meta":
        W[torch.arange(m), cols.to(W.device)] = 1.0
    return W


def validate_mixing(mixing: str, mixing_lr_scale: float) -> None:
    """Raise unless ``mixing`` is a known update of W and ``mixing_lr_scale`` fits it."""
    if mixing not in MIXING_UPDATES:
        raise ValueError(f"mixing_update must be one of {MIXING_UPDATES}, got {mixing!r}")
    if (
        not isinstance(mixing_lr_scale, (int, float))
        or isinstance(mixing_lr_scale, bool)
        or not math.isfinite(mixing_lr_scale)
        or mixing_lr_scale <= 0
    ):
        raise ValueError(f"mixing_lr_scale must be a finite number > 0, got {mixing_lr_scale!r}")
    if mixing == "adam" and mixing_lr_scale != 1:
        raise ValueError(
            f"mixing_lr_scale={mixing_lr_scale} has no effect with mixing_update='adam' (the reference "
            f"update of W itself); use mixing_update='scaled' or 'softmax' for a different step size of W"
        )


@torch.no_grad()
def project_rows_to_simplex_(W: torch.Tensor, row_sum: float = 1.0) -> None:
    """W_i <- row_sum relu(W_i) / sum_j relu(W_ij), in place; a row with no positive entry becomes uniform
    row_sum / n'. No host synchronisation (empty rows are handled with masks, not a branch)."""
    W.clamp_(min=0)
    sums = W.sum(dim=1, keepdim=True)
    empty = sums <= 0  # after the clamp such a row is all zeros
    W.add_(empty.to(W.dtype))  # ... and becomes all ones, then 1 / n' below
    W.div_(torch.where(empty, torch.full_like(sums, W.shape[1]), sums))
    if row_sum != 1:
        W.mul_(row_sum)


@torch.no_grad()
def clip_row_norms_(Lambda: torch.Tensor, delta: float) -> None:
    """Lambda_i <- Lambda_i * min(1, delta / ||Lambda_i||), in place (as delta / max(||Lambda_i||, delta))."""
    norms = Lambda.norm(dim=1, keepdim=True)
    Lambda.mul_(delta / norms.clamp(min=delta))


def _project_before_state_dict(module: ArchetypalDictionary, prefix: str, keep_vars: bool) -> None:
    module.ensure_projected_()  # what is saved satisfies the constraints


def _use_loaded_weights(module: ArchetypalDictionary, incompatible_keys: Any) -> None:
    module.invalidate_cache()
    module.mark_projected()  # loaded weights are used as saved (projected when they were saved)


# ------------------------------------------------------------------------------------------------ dictionary
class ArchetypalDictionary(nn.Module):
    """D = exp(m) diag(a) (W C + Lambda), W row-stochastic, ||Lambda_i|| <= delta (see the module docstring).

    ``dictionary()`` gives D (with a graph when gradients are on and the parameters require them, otherwise
    the cached D); ``compute()`` always recomputes; ``cached()`` is the graph-free cache; ``forward(z) = z D``
    for use as a decoder outside SAELens. Each of them, and ``state_dict()``, first calls
    :meth:`ensure_projected_`; :meth:`project_` projects unconditionally.
    """

    C: torch.Tensor
    atom_scale: torch.Tensor

    def __init__(
        self,
        d_sae: int,
        d_in: int,
        candidates: torch.Tensor,
        delta: float = 1.0,
        learn_scale: bool = False,
        init: DictionaryInit = "identity",
        init_seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        mixing: MixingUpdate = "adam",
        mixing_lr_scale: float = 1.0,
    ):
        super().__init__()
        validate_delta(delta)
        validate_candidates(candidates, d_in)
        validate_mixing(mixing, mixing_lr_scale)
        dtype = dtype or candidates.dtype
        device = torch.device(device) if device is not None else candidates.device
        self.d_sae, self.d_in, self.delta = d_sae, d_in, float(delta)
        self.n_candidates = int(candidates.shape[0])
        self.register_buffer("C", candidates.detach().to(device=device, dtype=dtype).clone())
        self.register_buffer("atom_scale", torch.ones(d_sae, dtype=dtype, device=device))
        self.mixing, self.mixing_lr_scale = mixing, float(mixing_lr_scale)
        W0 = initial_mixing_matrix(d_sae, self.n_candidates, init, init_seed, dtype, device)
        self.register_parameter(self.mixing_parameter_name, nn.Parameter(self._parameter_from_mixing(W0)))
        self.Lambda: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype, device=device)) if self.delta > 0 else None
        )
        self.log_scale: nn.Parameter | None = (
            nn.Parameter(torch.zeros((), dtype=dtype, device=device)) if learn_scale else None
        )
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self.n_computations = 0  # D computations with a graph or for the cache (for tests / profiling)
        self._n_forward_graphs = 0  # differentiable D of forward passes: an optimizer step may follow each
        self._projected_key: tuple[Any, ...] = ()
        self.mark_projected()  # one-hot rows and Lambda = 0 are used as built
        self.register_state_dict_pre_hook(_project_before_state_dict)
        self.register_load_state_dict_post_hook(_use_loaded_weights)

    @override
    def extra_repr(self) -> str:
        return (
            f"d_sae={self.d_sae}, n_candidates={self.n_candidates}, d_in={self.d_in}, delta={self.delta}, "
            f"learn_scale={self.log_scale is not None}, mixing={self.mixing!r}, "
            f"mixing_lr_scale={self.mixing_lr_scale}"
        )

    # -- the parametrisation of W (module docstring)
    @property
    def mixing_parameter_name(self) -> str:
        """Name of the parameter the optimizer steps for W: ``W``, ``W_scaled`` or ``W_logits``."""
        return _MIXING_PARAMETER_NAMES[self.mixing]

    @property
    def mixing_parameter(self) -> nn.Parameter:
        """The parameter the optimizer steps for W (W itself for ``mixing="adam"``)."""
        P = self._parameters.get(self.mixing_parameter_name)
        if P is None:  # during construction, before it is registered
            raise AttributeError(self.mixing_parameter_name)
        return P

    @property
    def W(self) -> torch.Tensor:
        """The row-stochastic mixing matrix [d_sae, n'] (differentiable; the parameter itself for "adam")."""
        if "W" in self._parameters:
            return self._parameters["W"]  # type: ignore[return-value]
        return self._mixing_from_parameter(self.mixing_parameter)

    def _mixing_from_parameter(self, P: torch.Tensor) -> torch.Tensor:
        if self.mixing == "scaled":
            return P * self.mixing_lr_scale
        if self.mixing == "softmax":
            return torch.softmax(P * self.mixing_lr_scale, dim=1)
        return P

    def _parameter_from_mixing(self, W0: torch.Tensor) -> torch.Tensor:
        """The parameter value whose W is the initial W0 (one-hot or zero rows; near one-hot for softmax)."""
        if self.mixing == "scaled":
            return W0 / self.mixing_lr_scale
        if self.mixing == "softmax":
            n = W0.shape[1]
            p0 = SOFTMAX_INIT_ROW_MAX
            margin = math.log(p0 * (n - 1) / (1 - p0)) if n > 1 else 0.0
            return W0 * (margin / self.mixing_lr_scale)
        return W0

    @torch.no_grad()
    def _parameter_from_saved_W(self, W: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_mixing_from_parameter` for a saved row-stochastic W (exact up to rounding;
        for "softmax" zero entries become log(tiny) / s)."""
        if self.mixing == "scaled":
            return W / self.mixing_lr_scale
        if self.mixing == "softmax":
            return W.clamp(min=torch.finfo(W.dtype).tiny).log() / self.mixing_lr_scale
        return W

    @override
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mixing != "adam":  # every file also holds the effective W, for readers that know only W
            W = self.W
            destination[prefix + "W"] = W if keep_vars else W.detach()

    @override
    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.mixing != "adam":
            raw_key, w_key = prefix + self.mixing_parameter_name, prefix + "W"
            if raw_key in state_dict:
                state_dict.pop(w_key, None)  # derived from the raw parameter when it was saved
            elif w_key in state_dict:  # a file with W only (an inference save, mixing_update="adam")
                state_dict[raw_key] = self._parameter_from_saved_W(state_dict.pop(w_key))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- constraints
    def _parameters_key(self) -> tuple[Any, ...]:
        """Changes when W or Lambda may have changed: in-place writes, new tensors, a forward pass."""
        params = (p for p in (self.mixing_parameter, self.Lambda) if p is not None)
        return (self._n_forward_graphs, *((id(p), p._version) for p in params))

    def mark_projected(self) -> None:
        """Record W and Lambda as feasible: :meth:`ensure_projected_` leaves them until they change."""
        self._projected_key = self._parameters_key()

    @torch.no_grad()
    def project_(self) -> None:
        """Project W onto row-stochastic matrices and each Lambda_i onto the delta-ball, in place."""
        P = self.mixing_parameter
        if P.device.type != "meta":
            with torch.inference_mode(False):
                if self.mixing != "softmax":  # softmax rows are on the simplex by construction
                    project_rows_to_simplex_(P, row_sum=1.0 / self.mixing_lr_scale)
                if self.Lambda is not None:
                    clip_row_norms_(self.Lambda, self.delta)
        self.mark_projected()

    def ensure_projected_(self) -> bool:
        """Project unless W and Lambda are unchanged since the last projection (or construction / loading).

        Returns whether it projected. Called before every use of the parameters (module docstring)."""
        if self._parameters_key() == self._projected_key:
            return False
        self.project_()
        return True

    @torch.no_grad()
    def constraint_violation(self) -> dict[str, float]:
        """Violations by the raw parameters: min W entry, max |row sum - 1|, max(||Lambda_i|| - delta, 0).

        Nonzero only between an optimizer step and the next :meth:`ensure_projected_`."""
        W = self.W.detach()
        out = {
            "W_min": float(W.min()),
            "W_row_sum_error": float((W.sum(dim=1) - 1).abs().max()),
            "Lambda_excess": 0.0,
        }
        if self.Lambda is not None:
            out["Lambda_excess"] = float((self.Lambda.norm(dim=1) - self.delta).clamp(min=0).max())
        return out

    # -- D
    def _tensors(self) -> list[torch.Tensor]:
        tensors = (self.C, self.mixing_parameter, self.Lambda, self.atom_scale, self.log_scale)
        return [t for t in tensors if t is not None]

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors())

    def compute(self) -> torch.Tensor:
        """D from projected parameters, recomputed (differentiable when grad mode is on)."""
        self.ensure_projected_()
        self.n_computations += 1
        D = self.W @ self.C if self.Lambda is None else torch.addmm(self.Lambda, self.W, self.C)
        if not self._atom_scale_is_one():
            D = D * self.atom_scale.unsqueeze(1)
        if self.log_scale is not None:
            D = D * self.log_scale.exp()
        return D

    def compute_for_step(self) -> torch.Tensor:
        """D for a forward pass that an optimizer step may follow: :meth:`compute`, and if D has a graph,
        the next use projects first even when the step moved no version counter (fused kernels)."""
        D = self.compute()
        if D.requires_grad:
            self._n_forward_graphs += 1
        return D

    def _atom_scale_is_one(self) -> bool:
        key = (id(self.atom_scale), self.atom_scale._version)
        if self.__dict__.get("_scale_key") != key:
            self._scale_key = key
            self._scale_is_one = self.atom_scale.device.type != "meta" and bool((self.atom_scale == 1).all())
        return self._scale_is_one

    def _cache_key_now(self) -> tuple[Any, ...]:
        return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in self._tensors())

    def cached(self) -> torch.Tensor:
        """D without a graph, recomputed only when a tensor it depends on changed."""
        self.ensure_projected_()
        key = self._cache_key_now()
        if self._cache is None or key != self._cache_key:
            with torch.inference_mode(False), torch.no_grad():
                self._cache = self.compute()
            self._cache_key = key
        return self._cache

    def invalidate_cache(self) -> None:
        self._cache, self._cache_key = None, None

    def dictionary(self) -> torch.Tensor:
        """D with a graph when gradients can flow to the parameters, else the cached D."""
        return self.compute() if self.needs_grad() else self.cached()

    @override
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ (self.compute_for_step() if self.needs_grad() else self.cached())


__all__ = [
    "ArchetypalDictionary",
    "DictionaryInit",
    "MIXING_UPDATES",
    "MixingUpdate",
    "SOFTMAX_INIT_ROW_MAX",
    "clip_row_norms_",
    "initial_mixing_matrix",
    "project_rows_to_simplex_",
    "validate_candidates",
    "validate_delta",
    "validate_mixing",
]
