"""Archetypal dictionaries and the A-SAE / RA-SAE architectures (Fel et al., ICML 2025, arXiv 2502.12892).

Dictionary (one row per latent)::

    D = exp(m) * diag(a) * (W C + Lambda)                                  [d_sae, d_in]

    C       [n', d_in]    fixed candidate points (k-means centroids of the activations), buffer ``C``
    W       [d_sae, n']   row-stochastic: W >= 0, W 1 = 1                  parameter ``W``
    Lambda  [d_sae, d_in] relaxation, ||Lambda_i||_2 <= delta             parameter ``Lambda`` (absent if delta = 0)
    m       scalar        optional learnable log-scale (reference code; off by default, the paper has none)
    a       [d_sae]       fixed per-atom scale, ones; only the folds (``fold_W_dec_norm``,
                          ``fold_activation_norm_scaling_factor``) change it, so they stay exact

delta = 0 is A-SAE (D in conv(C)); delta > 0 is RA-SAE. The encoder is SAELens's TopK:
``z = TopK(ReLU((x - b_dec) W_enc + b_enc))``, ``x_hat = z D + b_dec`` (plus TopK's auxiliary loss).

Constraints are kept by PROJECTION after every optimiser step (not inside ``forward``), through a global
``torch.optim`` step post-hook that projects every live dictionary whose ``W``/``Lambda`` the optimiser holds:

    W_i      <- relu(W_i) / sum(relu(W_i))        (a row with no positive entry becomes uniform 1/n')
    Lambda_i <- Lambda_i * min(1, delta / ||Lambda_i||)     (written as delta / max(||Lambda_i||, delta))

The reference code (``overcomplete``) applies the same projection in place at the START of each training
forward; projecting after the step instead means the stored parameters always satisfy the constraints,
``forward`` never writes parameters, and there is no 0/0 at delta = 0 (there is no Lambda at all).
Manual loops that update parameters without a ``torch.optim`` optimiser call :meth:`project_`.

Cost: D costs 2 d_sae n' d_in FLOPs forward and as much backward. It is computed ONCE per training step
(``training_forward_pass`` / ``forward`` hold one D for the encoder's norm rescale, the decoder and the TopK
auxiliary loss) and, outside training, cached without a graph; the cache key holds identity, storage and
version counter of every tensor D depends on, so optimiser steps, ``load_state_dict``, ``.to()`` and folds
invalidate it. W (d_sae x n' entries) also dominates the optimiser: a global pre-step hook switches an Adam
group holding W to PyTorch's fused kernel when the caller chose no kernel (SAELens's trainer does not).

The archetypal part only replaces the decoder matrix: :class:`ArchetypalDecoderMixin` turns any SAELens SAE
class whose code reads ``self.W_dec`` into an archetypal one (RA-SAE = mixin + SAELens TopK; the
``archetypal_matryoshka_topk`` variant = mixin + the plugin's Matryoshka TopK).

Architectures (SAELens names):

- ``ra_sae``: RA-SAE, TopK encoder + D = W C + Lambda (delta >= 0, default 1.0; delta = 0 gives A-SAE);
- ``a_sae``: A-SAE, the same with delta forced to 0 (no Lambda parameter);
- ``archetypal_matryoshka_topk``: the plugin's nested-TopK Matryoshka SAE (``matryoshka_topk``) with an
  archetypal dictionary (needs ``normalize_decoder=False`` and ``standardize_input=False``).

``to_plain_sae()`` / ``save_plain_model()`` export the same function with ``W_dec = D`` as SAELens ``topk``
(loads without the plugin) or as ``matryoshka_topk``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from sae_lens.saes.sae import SAE, SAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from typing_extensions import override

from sae_vision_ext.saes import register

DictionaryInit = Literal["identity", "random_candidates"]

_LIVE_DICTIONARIES: weakref.WeakSet[ArchetypalDictionary] = weakref.WeakSet()
_STEP_HOOK: Any = None


def _project_after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimiser post-step hook: re-project the archetypal dictionaries this optimiser updates."""
    if not _LIVE_DICTIONARIES:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for dictionary in list(_LIVE_DICTIONARIES):
        if id(dictionary.W) in held or (dictionary.Lambda is not None and id(dictionary.Lambda) in held):
            dictionary.project_()


def _fuse_adam_for_dictionaries(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimiser pre-step hook: before its first step, an Adam/AdamW param group holding an archetypal
    ``W`` switches to PyTorch's fused kernel when the caller chose neither ``foreach`` nor ``fused``.

    W has d_sae x n' entries (123M at the paper's size) and SAELens's ``SAETrainer`` builds a plain
    ``Adam(sae.parameters())``; on CPU that default is the per-tensor loop, which costs about a third of
    computing D, the fused kernel a sixth of that (``benchmarks/archetypal_step.py``). Same update rule
    (rounding aside). Opt out by passing ``foreach=`` or ``fused=`` to the optimiser."""
    if not _LIVE_DICTIONARIES or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    mixing = {id(d.W) for d in _LIVE_DICTIONARIES}
    for group in optimizer.param_groups:
        if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable"):
            continue
        params = group["params"]
        if (any(id(p) in mixing for p in params) and not any(p in optimizer.state for p in params)
                and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)):
            group["fused"] = True


def _ensure_step_hook() -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        _STEP_HOOK = (register_optimizer_step_pre_hook(_fuse_adam_for_dictionaries),
                      register_optimizer_step_post_hook(_project_after_optimizer_step))


def validate_candidates(candidates: torch.Tensor, d_in: int) -> None:
    """Raise a clear error for candidates that are not a finite, non-empty [n', d_in] matrix."""
    if not isinstance(candidates, torch.Tensor):
        raise TypeError(f"candidates must be a torch.Tensor, got {type(candidates).__name__}")
    if candidates.ndim != 2:
        raise ValueError(f"candidates must be a 2-D [n_candidates, d_in] matrix, got shape {tuple(candidates.shape)}")
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
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta (the bound on each ||Lambda_i||) must be a finite number >= 0, got {delta!r}")


def initial_mixing_matrix(d_sae: int, n_candidates: int, init: DictionaryInit = "identity",
                          seed: int | None = None, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> torch.Tensor:
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


class ArchetypalDictionary(nn.Module):
    """D = exp(m) * diag(a) * (W C + Lambda), with W row-stochastic and ||Lambda_i|| <= delta (module docstring).

    ``dictionary()`` gives D (with a graph when gradients are on and the parameters require them, otherwise
    the cached D); ``compute()`` always recomputes; ``cached()`` is the graph-free cache; ``project_()``
    enforces the constraints in place; ``forward(z) = z @ D`` for use as a decoder outside SAELens.
    """

    C: torch.Tensor
    atom_scale: torch.Tensor

    def __init__(self, d_sae: int, d_in: int, candidates: torch.Tensor, delta: float = 1.0,
                 learn_scale: bool = False, init: DictionaryInit = "identity", init_seed: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        validate_delta(delta)
        validate_candidates(candidates, d_in)
        dtype = dtype or candidates.dtype
        device = torch.device(device) if device is not None else candidates.device
        self.d_sae, self.d_in, self.delta = d_sae, d_in, float(delta)
        self.n_candidates = int(candidates.shape[0])
        self.register_buffer("C", candidates.detach().to(device=device, dtype=dtype).clone())
        self.register_buffer("atom_scale", torch.ones(d_sae, dtype=dtype, device=device))
        self.W = nn.Parameter(initial_mixing_matrix(d_sae, self.n_candidates, init, init_seed, dtype, device))
        self.Lambda: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype, device=device)) if self.delta > 0 else None
        )
        self.log_scale: nn.Parameter | None = (
            nn.Parameter(torch.zeros((), dtype=dtype, device=device)) if learn_scale else None
        )
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self.n_computations = 0  # D computations with a graph or for the cache (for tests / profiling)
        self.register_load_state_dict_post_hook(lambda module, keys: module.invalidate_cache())
        _LIVE_DICTIONARIES.add(self)
        _ensure_step_hook()

    def extra_repr(self) -> str:
        return (f"d_sae={self.d_sae}, n_candidates={self.n_candidates}, d_in={self.d_in}, delta={self.delta}, "
                f"learn_scale={self.log_scale is not None}")

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.C, self.W, self.Lambda, self.atom_scale, self.log_scale) if t is not None]

    def compute(self) -> torch.Tensor:
        """Recompute D (differentiable when grad mode is on)."""
        self.n_computations += 1
        D = self.W @ self.C if self.Lambda is None else torch.addmm(self.Lambda, self.W, self.C)
        if not self._atom_scale_is_one():
            D = D * self.atom_scale.unsqueeze(1)
        if self.log_scale is not None:
            D = D * self.log_scale.exp()
        return D

    def _atom_scale_is_one(self) -> bool:
        key = (id(self.atom_scale), self.atom_scale._version)
        if self.__dict__.get("_scale_key") != key:
            self._scale_key = key
            self._scale_is_one = self.atom_scale.device.type != "meta" and bool((self.atom_scale == 1).all())
        return self._scale_is_one

    def _key(self) -> tuple[Any, ...]:
        return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in self._tensors())

    def cached(self) -> torch.Tensor:
        """D without a graph, recomputed only when any tensor it depends on changed."""
        key = self._key()
        if self._cache is None or key != self._cache_key:
            with torch.inference_mode(False), torch.no_grad():
                self._cache = self.compute()
            self._cache_key = key
        return self._cache

    def invalidate_cache(self) -> None:
        self._cache, self._cache_key = None, None

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors())

    def dictionary(self) -> torch.Tensor:
        """D with a graph when gradients can flow to the parameters, else the cached D."""
        return self.compute() if self.needs_grad() else self.cached()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.dictionary()

    @torch.no_grad()
    def project_(self) -> None:
        """Enforce W row-stochastic and ||Lambda_i|| <= delta, in place (see the module docstring)."""
        W = self.W
        if W.device.type == "meta":
            return
        W.clamp_(min=0)
        sums = W.sum(dim=1, keepdim=True)
        empty = sums.squeeze(1) <= 0
        if bool(empty.any()):
            W[empty] = 1.0 / W.shape[1]
            sums[empty] = 1.0
        W.div_(sums)
        if self.Lambda is not None:
            norms = self.Lambda.norm(dim=1, keepdim=True)
            self.Lambda.mul_(self.delta / norms.clamp(min=self.delta))

    @torch.no_grad()
    def constraint_violation(self) -> dict[str, float]:
        """Largest violations: negative W entry, |row sum - 1|, and max(||Lambda_i|| - delta, 0)."""
        W = self.W.detach()
        out = {
            "W_min": float(W.min()),
            "W_row_sum_error": float((W.sum(dim=1) - 1).abs().max()),
            "Lambda_excess": 0.0,
        }
        if self.Lambda is not None:
            out["Lambda_excess"] = float((self.Lambda.norm(dim=1) - self.delta).clamp(min=0).max())
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> ArchetypalDictionary:
        self.invalidate_cache()
        return super()._apply(fn, recurse)


# ------------------------------------------------------------------------------------------------ configs
@dataclass(kw_only=True)
class ArchetypalFields:
    """Config fields shared by the inference and training configs of every archetypal architecture.

    n_candidates: number of candidate points n' (read from ``candidates_path`` when left None).
    delta: bound on each relaxation row ||Lambda_i|| (0 = A-SAE, no Lambda parameter).
    learn_dictionary_scale: learnable global scale exp(m) as in the reference code (the paper has none).
    """

    n_candidates: int | None = None
    delta: float = 1.0
    learn_dictionary_scale: bool = False


@dataclass(kw_only=True)
class ArchetypalTrainingFields(ArchetypalFields):
    """Training-only fields.

    candidates_path: candidates file written by ``sae-vision candidates`` / ``Candidates.save``.
    candidates_space: "data" (default: the centroids mapped back to the activations' space) or
        "standardized" (for an SAE trained on standardised activations).
    dictionary_init: "identity" (atom i = candidate i, the paper) or "random_candidates" (seeded choice).
    dictionary_init_seed: seed of "random_candidates".
    """

    candidates_path: str | None = None
    candidates_space: Literal["data", "standardized"] = "data"
    dictionary_init: DictionaryInit = "identity"
    dictionary_init_seed: int | None = None

    def get_inference_config_class(self) -> type[SAEConfig]:
        """The inference config registered under this architecture's name (an archetypal one)."""
        from sae_lens.registry import get_sae_class

        return get_sae_class(self.architecture())[1]  # type: ignore[attr-defined]


def _validate_archetypal_cfg(cfg: Any, forced_delta: float | None = None) -> None:
    validate_delta(cfg.delta)
    if forced_delta is not None and cfg.delta != forced_delta:
        raise ValueError(f"{cfg.architecture()} has no relaxation term: delta must be {forced_delta}, got "
                         f"{cfg.delta} (use 'ra_sae' for delta > 0)")
    if cfg.n_candidates is not None and cfg.n_candidates < 1:
        raise ValueError(f"zero candidates: n_candidates must be >= 1, got {cfg.n_candidates}")


def _validate_archetypal_training_cfg(cfg: Any, forced_delta: float | None = None) -> None:
    _validate_archetypal_cfg(cfg, forced_delta)
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"archetypal SAEs need their candidates in the space the SAE sees, so normalize_activations must be "
            f"'none' (got {cfg.normalize_activations!r}); scale or standardise the activations upstream and "
            f"compute the candidates from the same rows"
        )
    if cfg.candidates_space not in ("data", "standardized"):
        raise ValueError(f"candidates_space must be 'data' or 'standardized', got {cfg.candidates_space!r}")
    if cfg.dictionary_init not in ("identity", "random_candidates"):
        raise ValueError(f"dictionary_init must be 'identity' or 'random_candidates', got {cfg.dictionary_init!r}")
    if cfg.candidates_path is not None:
        from sae_vision_ext.training.candidates import candidates_shape

        path = Path(cfg.candidates_path)
        if path.exists():
            n, d = candidates_shape(path)
            if d != cfg.d_in:
                raise ValueError(f"candidates in {path} have width {d} but the SAE's d_in is {cfg.d_in}")
            if cfg.n_candidates is None:
                cfg.n_candidates = n
            elif cfg.n_candidates != n:
                raise ValueError(f"n_candidates is {cfg.n_candidates} but {path} holds {n} candidates")
        elif cfg.n_candidates is None:
            raise FileNotFoundError(f"candidates file not found: {path} (create one with `sae-vision candidates`)")


@dataclass
class RASAEConfig(ArchetypalFields, TopKSAEConfig):
    """Inference config of ``ra_sae``: TopK encoder + relaxed archetypal dictionary (see the module docstring)."""

    forced_delta: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_archetypal_cfg(self, self.forced_delta)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "ra_sae"


@dataclass
class ASAEConfig(RASAEConfig):
    """Inference config of ``a_sae``: TopK encoder + archetypal dictionary D = W C (delta = 0)."""

    forced_delta: ClassVar[float | None] = 0.0
    delta: float = field(default=0.0, kw_only=True)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "a_sae"


@dataclass
class RASAETrainingSAEConfig(ArchetypalTrainingFields, TopKTrainingSAEConfig):
    """Training config of ``ra_sae``. TopK fields as in SAELens, but ``rescale_acts_by_decoder_norm`` defaults
    to False (the paper's TopK SAE does not rescale); archetypal fields in :class:`ArchetypalTrainingFields`."""

    forced_delta: ClassVar[float | None] = None
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_archetypal_training_cfg(self, self.forced_delta)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "ra_sae"


@dataclass
class ASAETrainingSAEConfig(RASAETrainingSAEConfig):
    """Training config of ``a_sae`` (delta forced to 0)."""

    forced_delta: ClassVar[float | None] = 0.0
    delta: float = field(default=0.0, kw_only=True)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "a_sae"


# -------------------------------------------------------------------------------------------------- mixin
class ArchetypalDecoderMixin:
    """Replace an SAE's ``W_dec`` parameter by an :class:`ArchetypalDictionary` (attribute ``archetypal``).

    Put it first in the bases (``class X(ArchetypalDecoderMixin, SomeSAE)``) and add
    :class:`ArchetypalFields` (or :class:`ArchetypalTrainingFields`) to the config. ``self.W_dec`` then
    returns D: inside ``forward`` / ``training_forward_pass`` one D shared by every use; elsewhere a fresh
    differentiable D when training with gradients on, else the cached D. Code that writes ``W_dec`` in place
    must be overridden (the folds are, here). ``plain_sae_class`` / ``plain_config_class`` name the SAELens
    architecture that :meth:`to_plain_sae` exports to, with ``W_dec = D``.
    """

    archetypal: ArchetypalDictionary
    cfg: Any
    plain_sae_class: type[SAE[Any]] = TopKSAE
    plain_config_class: type[SAEConfig] = TopKSAEConfig
    differentiable_dictionary: bool = False  # True for training classes

    def __init__(self, cfg: Any, use_error_term: bool = False, candidates: torch.Tensor | None = None):
        object.__setattr__(self, "_init_candidates", candidates)
        object.__setattr__(self, "_step_dictionary", None)
        super().__init__(cfg, use_error_term)  # type: ignore[call-arg]
        object.__setattr__(self, "_init_candidates", None)

    def __getattr__(self, name: str) -> Any:
        if name == "W_dec":
            modules = self.__dict__.get("_modules")
            if modules is not None and "archetypal" in modules:
                return self._current_dictionary()
        return super().__getattr__(name)  # type: ignore[misc]

    def _current_dictionary(self) -> torch.Tensor:
        step = self.__dict__.get("_step_dictionary")
        if step is not None:
            return step
        if self.differentiable_dictionary and self.training and self.archetypal.needs_grad():  # type: ignore[attr-defined]
            return self.archetypal.compute()
        return self.archetypal.cached()

    @contextmanager
    def one_dictionary(self):
        """Within this block every read of ``W_dec`` returns the same D (computed once)."""
        if self.__dict__.get("_step_dictionary") is not None:
            yield
            return
        object.__setattr__(self, "_step_dictionary", self._current_dictionary())
        try:
            yield
        finally:
            object.__setattr__(self, "_step_dictionary", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.one_dictionary():
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]

    # ---- construction
    def initialize_weights(self) -> None:
        super().initialize_weights()  # type: ignore[misc]
        del self.W_dec  # the base class's decoder parameter; D replaces it
        self.archetypal = self._build_dictionary()

    def _initial_candidates(self) -> torch.Tensor:
        cfg = self.cfg
        device = torch.device(cfg.device)
        given = self.__dict__.get("_init_candidates")
        if given is not None:
            validate_candidates(given, cfg.d_in)
            if cfg.n_candidates is not None and cfg.n_candidates != given.shape[0]:
                raise ValueError(f"n_candidates is {cfg.n_candidates} but {given.shape[0]} candidates were given")
            cfg.n_candidates = int(given.shape[0])
            return given
        path = getattr(cfg, "candidates_path", None)
        if device.type != "meta" and path is not None:
            from sae_vision_ext.training.candidates import load_candidates

            cands = load_candidates(path, space=getattr(cfg, "candidates_space", "data"))
            validate_candidates(cands, cfg.d_in)
            if cfg.n_candidates is not None and cfg.n_candidates != cands.shape[0]:
                raise ValueError(f"n_candidates is {cfg.n_candidates} but {path} holds {cands.shape[0]} candidates")
            cfg.n_candidates = int(cands.shape[0])
            return cands
        if cfg.n_candidates is None:
            raise ValueError(
                f"{cfg.architecture()} needs candidates: set candidates_path (see `sae-vision candidates`), "
                f"pass candidates=..., or set n_candidates when loading weights"
            )
        if self.differentiable_dictionary and device.type != "meta":
            warnings.warn(
                "archetypal training SAE built without candidates (C = 0); load weights before training",
                UserWarning,
                stacklevel=4,
            )
        return torch.zeros(cfg.n_candidates, cfg.d_in, device=device)

    def _build_dictionary(self) -> ArchetypalDictionary:
        cfg = self.cfg
        cands = self._initial_candidates()
        with warnings.catch_warnings():
            if torch.device(cfg.device).type == "meta" or not self.differentiable_dictionary:
                warnings.simplefilter("ignore", UserWarning)  # loading: the weights replace the init
            return ArchetypalDictionary(
                cfg.d_sae,
                cfg.d_in,
                cands,
                delta=cfg.delta,
                learn_scale=cfg.learn_dictionary_scale,
                init=getattr(cfg, "dictionary_init", "identity"),
                init_seed=getattr(cfg, "dictionary_init_seed", None),
                dtype=self.dtype,  # type: ignore[attr-defined]
                device=cfg.device,
            )

    # ---- constraints, folds, export
    def project_(self) -> None:
        """Project W / Lambda onto their constraint sets (done automatically after optimiser steps)."""
        self.archetypal.project_()

    def fold_W_dec_norm_is_exact(self) -> bool:
        """TopK picks latents by z_i (changed by the fold) unless it ranks by z_i ||D_i||."""
        return bool(getattr(self.cfg, "rescale_acts_by_decoder_norm", False))

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold the atom norms into the encoder (D_i /= n_i, W_enc[:, i] *= n_i, b_enc_i *= n_i); exact only when
        the TopK ranks by z_i ||D_i|| (``rescale_acts_by_decoder_norm``), as for SAELens's TopK."""
        if not self.fold_W_dec_norm_is_exact():
            raise NotImplementedError(
                "Folding W_dec_norm changes which latents win the TopK unless rescale_acts_by_decoder_norm is True"
            )
        norms = self.get_W_dec_norm()  # type: ignore[attr-defined]
        self.archetypal.atom_scale.div_(norms)
        self.W_enc.data.mul_(norms)  # type: ignore[attr-defined]
        if isinstance(getattr(self, "b_enc", None), nn.Parameter):
            self.b_enc.data.mul_(norms)  # type: ignore[attr-defined]

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold an input scale s (the SAE saw s x) into the weights: W_enc *= s, D /= s, b_dec /= s."""
        self.W_enc.data.mul_(scaling_factor)  # type: ignore[attr-defined]
        self.archetypal.atom_scale.div_(scaling_factor)
        self.b_dec.data.div_(scaling_factor)  # type: ignore[attr-defined]
        self.cfg.normalize_activations = "none"

    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "whitening cannot be folded into an archetypal dictionary (the ||Lambda_i|| <= delta ball is not "
            "preserved); export with to_plain_sae() first"
        )

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        # no decoder-norm fold: the inference class applies rescale_acts_by_decoder_norm itself
        self.process_state_dict_for_saving(state_dict)  # type: ignore[attr-defined]

    @torch.no_grad()
    def to_plain_sae(self) -> SAE[Any]:
        """The same function as a plain (non-archetypal) SAELens inference SAE with ``W_dec = D``."""
        cfg_fields = {f.name for f in fields(self.plain_config_class)}
        values = {name: getattr(self.cfg, name) for name in cfg_fields if hasattr(self.cfg, name)}
        values.pop("metadata", None)
        plain_cfg = self.plain_config_class(**values)
        meta = self.cfg.metadata.to_dict()
        meta.update({"exported_from_architecture": self.cfg.architecture(), "exported_from_n_candidates":
                     self.cfg.n_candidates, "exported_from_delta": self.cfg.delta})
        meta.pop("training_architecture", None)
        meta.pop("training_architecture_details", None)
        plain_cfg.metadata = type(self.cfg.metadata)(**meta)
        plain = self.plain_sae_class(plain_cfg)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("archetypal.")}  # type: ignore[attr-defined]
        state["W_dec"] = self.archetypal.cached().clone()
        plain.load_state_dict(state)
        return plain.to(self.archetypal.C.device)

    def save_plain_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save :meth:`to_plain_sae` as a SAELens folder that loads without this plugin."""
        return self.to_plain_sae().save_model(path)


class ArchetypalTrainingMixin(ArchetypalDecoderMixin):
    """Training side: D is differentiable and computed once per ``training_forward_pass``."""

    differentiable_dictionary = True

    def training_forward_pass(self, step_input: Any) -> Any:
        with self.one_dictionary():
            return super().training_forward_pass(step_input)  # type: ignore[misc]

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        hist = super().log_histograms()  # type: ignore[misc]
        hist["weights/archetypal_W_max"] = self.archetypal.W.detach().float().max(dim=1).values.cpu().numpy()
        if self.archetypal.Lambda is not None:
            hist["weights/archetypal_Lambda_norms"] = self.archetypal.Lambda.detach().float().norm(dim=1).cpu().numpy()
        return hist


# ------------------------------------------------------------------------------------------- architectures
class RASAE(ArchetypalDecoderMixin, TopKSAE):
    """Inference RA-SAE (``ra_sae``): SAELens TopK encoder, D = W C + Lambda cached as ``W_dec``."""

    cfg: RASAEConfig  # type: ignore[assignment]


class ASAE(RASAE):
    """Inference A-SAE (``a_sae``): as :class:`RASAE` with delta = 0."""

    cfg: ASAEConfig  # type: ignore[assignment]


class RASAETrainingSAE(ArchetypalTrainingMixin, TopKTrainingSAE):
    """Training RA-SAE (``ra_sae``): SAELens TopK training (incl. the auxiliary loss) on D = W C + Lambda."""

    cfg: RASAETrainingSAEConfig  # type: ignore[assignment]


class ASAETrainingSAE(RASAETrainingSAE):
    """Training A-SAE (``a_sae``): delta = 0."""

    cfg: ASAETrainingSAEConfig  # type: ignore[assignment]


# ------------------------------------------------------------------------- archetypal Matryoshka (issue 3)
try:
    from sae_vision_ext.saes.matryoshka_topk import (
        MatryoshkaTopKSAE,
        MatryoshkaTopKSAEConfig,
        MatryoshkaTopKTrainingSAE,
        MatryoshkaTopKTrainingSAEConfig,
    )
except ImportError:  # pragma: no cover - the Matryoshka module is optional for this one
    MatryoshkaTopKSAE = None  # type: ignore[assignment,misc]


def _validate_archetypal_matryoshka(cfg: Any) -> None:
    if cfg.standardize_input:
        raise ValueError(
            "archetypal_matryoshka_topk does not support standardize_input: the candidates must live in the space "
            "the dictionary works in; standardise the activations upstream and compute the candidates on them"
        )
    if getattr(cfg, "normalize_decoder", False):
        raise ValueError(
            "archetypal_matryoshka_topk needs normalize_decoder=False: the atom norms are set by the archetypal "
            "constraint (D = W C + Lambda), not by unit-norm rows"
        )


if MatryoshkaTopKSAE is not None:

    @dataclass
    class ArchetypalMatryoshkaTopKSAEConfig(ArchetypalFields, MatryoshkaTopKSAEConfig):
        """Inference config: the plugin's nested-TopK Matryoshka encoder + archetypal dictionary."""

        def __post_init__(self) -> None:
            super().__post_init__()
            _validate_archetypal_cfg(self)
            _validate_archetypal_matryoshka(self)

        @override
        @classmethod
        def architecture(cls) -> str:
            return "archetypal_matryoshka_topk"

    @dataclass
    class ArchetypalMatryoshkaTopKTrainingSAEConfig(ArchetypalTrainingFields, MatryoshkaTopKTrainingSAEConfig):
        """Training config: Matryoshka fields (k_levels, level_weighting, ...) + archetypal fields; the decoder
        row normalisation of the Matryoshka SAE is off (``normalize_decoder=False``, required)."""

        normalize_decoder: bool = False

        def __post_init__(self) -> None:
            super().__post_init__()
            _validate_archetypal_training_cfg(self)
            _validate_archetypal_matryoshka(self)

        @override
        @classmethod
        def architecture(cls) -> str:
            return "archetypal_matryoshka_topk"

    class _ArchetypalMatryoshkaExport:
        plain_sae_class = MatryoshkaTopKSAE
        plain_config_class = MatryoshkaTopKSAEConfig

        def fold_W_dec_norm_is_exact(self) -> bool:
            return True  # the Matryoshka TopK ranks latents by z_i ||D_i||, which the fold leaves unchanged

        def set_decoder_norm_to_unit_norm(self) -> None:
            raise NotImplementedError("an archetypal dictionary has no free decoder rows to renormalise")

    class ArchetypalMatryoshkaTopKSAE(_ArchetypalMatryoshkaExport, ArchetypalDecoderMixin, MatryoshkaTopKSAE):
        """Inference Matryoshka SAE (any k at inference, ReLU by default) with D = W C + Lambda."""

    class ArchetypalMatryoshkaTopKTrainingSAE(
        _ArchetypalMatryoshkaExport, ArchetypalTrainingMixin, MatryoshkaTopKTrainingSAE
    ):
        """Training Matryoshka SAE (nested TopK losses) with D = W C + Lambda computed once per step."""


# ------------------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def init_decoder_from_candidates(sae: SAE[Any], candidates: torch.Tensor, init: DictionaryInit = "identity",
                                 seed: int | None = None) -> None:
    """Set a plain SAE's ``W_dec`` rows to candidates exactly as an archetypal dictionary would start
    (``W_dec = W0 C``): the control for stability comparisons (a TopK SAE started from the same centroids).
    The encoder is left as initialised."""
    if not isinstance(sae.__dict__.get("_parameters", {}).get("W_dec"), nn.Parameter):
        raise TypeError("init_decoder_from_candidates needs an SAE whose W_dec is a parameter")
    validate_candidates(candidates, sae.cfg.d_in)
    W0 = initial_mixing_matrix(sae.cfg.d_sae, candidates.shape[0], init, seed, dtype=torch.float64)
    sae.W_dec.data.copy_((W0 @ candidates.double()).to(sae.W_dec.dtype))


ARCHITECTURES: list[tuple[str, type, type, type, type]] = [
    ("ra_sae", RASAE, RASAEConfig, RASAETrainingSAE, RASAETrainingSAEConfig),
    ("a_sae", ASAE, ASAEConfig, ASAETrainingSAE, ASAETrainingSAEConfig),
]
if MatryoshkaTopKSAE is not None:
    ARCHITECTURES.append((
        "archetypal_matryoshka_topk",
        ArchetypalMatryoshkaTopKSAE,
        ArchetypalMatryoshkaTopKSAEConfig,
        ArchetypalMatryoshkaTopKTrainingSAE,
        ArchetypalMatryoshkaTopKTrainingSAEConfig,
    ))
register(ARCHITECTURES)

__all__ = [
    "ARCHITECTURES",
    "ASAE",
    "ASAEConfig",
    "ASAETrainingSAE",
    "ASAETrainingSAEConfig",
    "ArchetypalDecoderMixin",
    "ArchetypalDictionary",
    "ArchetypalFields",
    "ArchetypalTrainingFields",
    "ArchetypalTrainingMixin",
    "RASAE",
    "RASAEConfig",
    "RASAETrainingSAE",
    "RASAETrainingSAEConfig",
    "ArchetypalMatryoshkaTopKSAE",
    "ArchetypalMatryoshkaTopKSAEConfig",
    "ArchetypalMatryoshkaTopKTrainingSAE",
    "ArchetypalMatryoshkaTopKTrainingSAEConfig",
    "init_decoder_from_candidates",
    "initial_mixing_matrix",
    "validate_candidates",
    "validate_delta",
]
