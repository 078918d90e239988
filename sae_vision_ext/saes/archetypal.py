"""Archetypal SAEs: A-SAE and RA-SAE (Fel et al., "Archetypal SAE", ICML 2025, arXiv 2502.12892).

An archetypal SAE is SAELens's TopK SAE whose decoder is tied to the data: each atom is a convex combination
of fixed candidate points C, moved by at most delta (the dictionary, its constraints and where they are
enforced: :mod:`sae_vision_ext.saes.archetypal_dictionary`)::

    D = W C + Lambda,     W >= 0,  W 1 = 1,     ||Lambda_i||_2 <= delta          (delta = 0: A-SAE)

    z = TopK(ReLU((x - b_dec) W_enc + b_enc)),        x_hat = z D + b_dec

plus TopK's auxiliary loss. How the optimizer moves W is the training field ``mixing_update`` ("adam", the
reference code's plain step on W and the default; "scaled"; "softmax"; math in the dictionary module).
``W_dec`` is a read-only property giving D, so SAELens's encode, decode, losses,
folds and saving work unchanged. D is computed ONCE per training step (inside ``training_forward_pass`` /
``forward`` every read of ``W_dec`` gives the same D: the encoder's norm rescale, the decoder and the TopK
auxiliary loss) and cached without a graph outside training.

The constraints are the dictionary's own business: before every use of W and Lambda it projects them if an
optimizer step (or any write) may have changed them since it last did, i.e. once after each optimizer step,
at the start of the next ``training_forward_pass`` or when the weights are first read for saving, folding or
inference. No optimizer is touched, so SAELens's ``SAETrainer`` and runners, the plugin's runner and
hand-written loops train these SAEs alike, and saved weights always satisfy the constraints.

Architectures (SAELens names):

- ``ra_sae``: RA-SAE (delta >= 0, default 1.0; delta = 0 gives A-SAE);
- ``a_sae``: A-SAE, delta forced to 0 (no Lambda parameter);
- ``archetypal_matryoshka_topk``: the plugin's nested-TopK Matryoshka SAE (``matryoshka_topk``) with an
  archetypal dictionary (needs ``normalize_decoder=False`` and ``standardize_input=False``).

:class:`ArchetypalDecoderMixin` turns a SAELens SAE class whose code reads ``self.W_dec`` into an
archetypal one. ``to_plain_sae()`` / ``save_plain_model()`` export the same function with ``W_dec = D`` as
SAELens ``topk`` (loads without the plugin) or as ``matryoshka_topk``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from torch import nn
from typing_extensions import override

from sae_vision_ext.saes import register
from sae_vision_ext.saes.archetypal_dictionary import (
    MIXING_UPDATES,
    ArchetypalDictionary,
    DictionaryInit,
    MixingUpdate,
    initial_mixing_matrix,
    validate_candidates,
    validate_delta,
    validate_mixing,
)
from sae_vision_ext.saes.candidates_file import CandidatesSpace, candidates_shape, load_candidates
from sae_vision_ext.saes.matryoshka_topk import (
    MatryoshkaTopKSAE,
    MatryoshkaTopKSAEConfig,
    MatryoshkaTopKTrainingSAE,
    MatryoshkaTopKTrainingSAEConfig,
)


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

    candidates_path: candidates file written by ``sae-vision candidates`` / ``Candidates.save``
        (format in :mod:`sae_vision_ext.saes.candidates_file`).
    candidates_space: "data" (default: the centroids mapped back to the activations' space) or
        "standardized" (for an SAE trained on standardised activations).
    dictionary_init: "identity" (atom i = candidate i, the paper) or "random_candidates" (seeded choice).
    dictionary_init_seed: seed of "random_candidates".
    mixing_update: how the optimizer moves the mixing matrix W (math in
        :mod:`sae_vision_ext.saes.archetypal_dictionary`): "adam" (the reference code: the optimizer steps W
        itself, then W is projected onto the simplex), "scaled" (W = s P, the optimizer steps P: W moves
        ~s lr per step under Adam) or "softmax" (W_i = softmax(s L_i), the optimizer steps the logits L:
        multiplicative updates that keep W on the simplex and near-zero entries near zero).
    mixing_lr_scale: s above (> 0; must be 1 for "adam").
    Training-only: the inference SAE stores the effective W, whatever the update.
    """

    candidates_path: str | None = None
    candidates_space: CandidatesSpace = "data"
    dictionary_init: DictionaryInit = "identity"
    dictionary_init_seed: int | None = None
    mixing_update: MixingUpdate = "adam"
    mixing_lr_scale: float = 1.0

    def get_inference_config_class(self) -> type[SAEConfig]:
        """The inference config registered under this architecture's name (an archetypal one)."""
        return get_sae_class(self.architecture())[1]  # type: ignore[attr-defined]


def _validate_archetypal_cfg(cfg: Any, forced_delta: float | None = None) -> None:
    validate_delta(cfg.delta)
    if forced_delta is not None and cfg.delta != forced_delta:
        raise ValueError(
            f"{cfg.architecture()} has no relaxation term: delta must be {forced_delta}, got {cfg.delta} "
            f"(use 'ra_sae' for delta > 0)"
        )
    if cfg.n_candidates is not None and cfg.n_candidates < 1:
        raise ValueError(f"zero candidates: n_candidates must be >= 1, got {cfg.n_candidates}")


def _validate_archetypal_training_cfg(cfg: Any, forced_delta: float | None = None) -> None:
    _validate_archetypal_cfg(cfg, forced_delta)
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"archetypal SAEs need their candidates in the space the SAE sees, so normalize_activations must "
            f"be 'none' (got {cfg.normalize_activations!r}); scale or standardise the activations upstream "
            f"and compute the candidates from the same rows"
        )
    if cfg.candidates_space not in ("data", "standardized"):
        raise ValueError(f"candidates_space must be 'data' or 'standardized', got {cfg.candidates_space!r}")
    if cfg.dictionary_init not in ("identity", "random_candidates"):
        raise ValueError(
            f"dictionary_init must be 'identity' or 'random_candidates', got {cfg.dictionary_init!r}"
        )
    validate_mixing(cfg.mixing_update, cfg.mixing_lr_scale)
    if cfg.candidates_path is None:
        return
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
        raise FileNotFoundError(
            f"candidates file not found: {path} (create one with `sae-vision candidates`)"
        )


@dataclass
class RASAEConfig(ArchetypalFields, TopKSAEConfig):
    """Inference config of ``ra_sae``: TopK encoder + relaxed archetypal dictionary (module docstring)."""

    forced_delta: ClassVar[float | None] = None

    @override
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
    """Training config of ``ra_sae``. TopK fields as in SAELens, but ``rescale_acts_by_decoder_norm``
    defaults to False (the paper's TopK SAE does not rescale); archetypal fields in
    :class:`ArchetypalTrainingFields`."""

    forced_delta: ClassVar[float | None] = None
    rescale_acts_by_decoder_norm: bool = False

    @override
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


# ------------------------------------------------------------------------------------------------ mixins
class ArchetypalDecoderMixin(SAE[Any]):
    """Replace an SAE's ``W_dec`` parameter by an :class:`ArchetypalDictionary` (attribute ``archetypal``).

    Put it first in the bases (``class X(ArchetypalDecoderMixin, SomeSAE)``) and add
    :class:`ArchetypalFields` (or :class:`ArchetypalTrainingFields`) to the config. ``W_dec`` is a read-only
    property giving D: inside ``forward`` / ``training_forward_pass`` one D shared by every read; elsewhere a
    fresh differentiable D when a training class trains with gradients on, else the cached D. SAELens code
    that writes ``W_dec`` in place must be overridden (the folds are, here). ``plain_sae_class`` /
    ``plain_config_class`` name the SAELens architecture :meth:`to_plain_sae` exports to, with ``W_dec = D``.
    """

    archetypal: ArchetypalDictionary
    plain_sae_class: ClassVar[type[SAE[Any]]] = TopKSAE
    plain_config_class: ClassVar[type[SAEConfig]] = TopKSAEConfig
    differentiable_dictionary: ClassVar[bool] = False  # True for training classes

    def __init__(self, cfg: Any, use_error_term: bool = False, candidates: torch.Tensor | None = None):
        self._candidates_for_init = candidates  # read by initialize_weights, inside SAE.__init__
        self._step_dictionary: torch.Tensor | None = None  # the one D of the running forward pass
        super().__init__(cfg, use_error_term)
        self._candidates_for_init = None

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        """The dictionary D [d_sae, d_in] (read-only) that SAELens's encode, decode, losses and folds read."""
        if "archetypal" in self._modules:
            return self._current_dictionary()
        if "W_dec" in self._parameters:  # SAELens's initialize_weights, before the dictionary replaces it
            return self._parameters["W_dec"]
        raise AttributeError("W_dec")

    def _current_dictionary(self, for_step: bool = False) -> torch.Tensor:
        if self._step_dictionary is not None:
            return self._step_dictionary
        if self.differentiable_dictionary and self.training and self.archetypal.needs_grad():
            return self.archetypal.compute_for_step() if for_step else self.archetypal.compute()
        return self.archetypal.cached()

    @contextmanager
    def one_dictionary(self) -> Iterator[None]:
        """Within this block every read of ``W_dec`` returns the same D (computed once)."""
        if self._step_dictionary is not None:
            yield
            return
        self._step_dictionary = self._current_dictionary(for_step=True)
        try:
            yield
        finally:
            self._step_dictionary = None

    @override
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.one_dictionary():
            return super().forward(x, *args, **kwargs)

    # -- construction
    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()  # SAELens's initialisation (W_enc, biases) from its own W_dec
        del self.W_dec  # that decoder parameter: the archetypal dictionary replaces it
        self.archetypal = self._build_dictionary()

    def _initial_candidates(self) -> torch.Tensor:
        cfg = self.cfg
        device = torch.device(cfg.device)
        given = self._candidates_for_init
        if given is not None:
            validate_candidates(given, cfg.d_in)
            if cfg.n_candidates is not None and cfg.n_candidates != given.shape[0]:
                raise ValueError(
                    f"n_candidates is {cfg.n_candidates} but {given.shape[0]} candidates were given"
                )
            cfg.n_candidates = int(given.shape[0])
            return given
        path = getattr(cfg, "candidates_path", None)
        if device.type != "meta" and path is not None:
            cands = load_candidates(path, space=getattr(cfg, "candidates_space", "data"))
            validate_candidates(cands, cfg.d_in)
            if cfg.n_candidates is not None and cfg.n_candidates != cands.shape[0]:
                raise ValueError(
                    f"n_candidates is {cfg.n_candidates} but {path} holds {cands.shape[0]} candidates"
                )
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
                dtype=self.dtype,
                device=cfg.device,
                mixing=getattr(cfg, "mixing_update", "adam"),
                mixing_lr_scale=getattr(cfg, "mixing_lr_scale", 1.0),
            )

    # -- constraints, folds, export
    def project_(self) -> None:
        """Project W / Lambda onto their constraint sets now (otherwise done before their next use)."""
        self.archetypal.project_()

    def fold_W_dec_norm_is_exact(self) -> bool:
        """TopK picks latents by z_i (changed by the fold) unless it ranks by z_i ||D_i||."""
        return bool(getattr(self.cfg, "rescale_acts_by_decoder_norm", False))

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold the atom norms into the encoder (D_i /= n_i, W_enc[:, i] *= n_i, b_enc_i *= n_i); exact only
        when the TopK ranks by z_i ||D_i|| (``rescale_acts_by_decoder_norm``), as for SAELens's TopK."""
        if not self.fold_W_dec_norm_is_exact():
            raise NotImplementedError(
                "Folding W_dec_norm changes which latents win the TopK unless rescale_acts_by_decoder_norm "
                "is True"
            )
        norms = self.get_W_dec_norm()
        self.archetypal.atom_scale.div_(norms)
        self.W_enc.data.mul_(norms)
        b_enc = getattr(self, "b_enc", None)
        if isinstance(b_enc, nn.Parameter):
            b_enc.data.mul_(norms)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold an input scale s (the SAE saw s x) into the weights: W_enc *= s, D /= s, b_dec /= s."""
        self.W_enc.data.mul_(scaling_factor)
        self.archetypal.atom_scale.div_(scaling_factor)
        self.b_dec.data.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    @override
    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "whitening cannot be folded into an archetypal dictionary (the ||Lambda_i|| <= delta ball is not "
            "preserved); export with to_plain_sae() first"
        )

    @torch.no_grad()
    def to_plain_sae(self) -> SAE[Any]:
        """The same function as a plain (non-archetypal) SAELens inference SAE with ``W_dec = D``."""
        cfg_fields = {f.name for f in fields(self.plain_config_class)}
        values = {name: getattr(self.cfg, name) for name in cfg_fields if hasattr(self.cfg, name)}
        values.pop("metadata", None)
        plain_cfg = self.plain_config_class(**values)
        meta = self.cfg.metadata.to_dict()
        meta.update(
            {
                "exported_from_architecture": self.cfg.architecture(),
                "exported_from_n_candidates": self.cfg.n_candidates,
                "exported_from_delta": self.cfg.delta,
            }
        )
        meta.pop("training_architecture", None)
        meta.pop("training_architecture_details", None)
        plain_cfg.metadata = type(self.cfg.metadata)(**meta)
        plain = self.plain_sae_class(plain_cfg)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("archetypal.")}
        state["W_dec"] = self.archetypal.cached().clone()
        plain.load_state_dict(state)
        return plain.to(self.archetypal.C.device)

    def save_plain_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save :meth:`to_plain_sae` as a SAELens folder that loads without this plugin."""
        return self.to_plain_sae().save_model(path)


class ArchetypalTrainingMixin(ArchetypalDecoderMixin, TrainingSAE[Any]):
    """Training side: D is differentiable and computed once per ``training_forward_pass``."""

    differentiable_dictionary: ClassVar[bool] = True

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with self.one_dictionary():  # projects W / Lambda first if the last optimizer step changed them
            return super().training_forward_pass(step_input)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        # no decoder-norm fold: the inference class applies rescale_acts_by_decoder_norm itself
        self.process_state_dict_for_saving(state_dict)
        # the inference dictionary stores the effective W (already in the state dict) and no raw parameter
        raw_name = self.archetypal.mixing_parameter_name
        if raw_name != "W":
            state_dict.pop(f"archetypal.{raw_name}", None)

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        hist = super().log_histograms()
        d = self.archetypal
        d.ensure_projected_()
        hist["weights/archetypal_W_max"] = d.W.detach().float().max(dim=1).values.cpu().numpy()
        if d.Lambda is not None:
            hist["weights/archetypal_Lambda_norms"] = d.Lambda.detach().float().norm(dim=1).cpu().numpy()
        return hist


# ---------------------------------------------------------------------------------------------- RA-SAE, A-SAE
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


# ------------------------------------------------------------------------------------------------ Matryoshka
def _validate_archetypal_matryoshka(cfg: Any) -> None:
    if cfg.standardize_input:
        raise ValueError(
            "archetypal_matryoshka_topk does not support standardize_input: the candidates must live in the "
            "space the dictionary works in; standardise the activations upstream and compute the candidates "
            "on them"
        )
    if getattr(cfg, "normalize_decoder", False):
        raise ValueError(
            "archetypal_matryoshka_topk needs normalize_decoder=False: the atom norms are set by the "
            "archetypal constraint (D = W C + Lambda), not by unit-norm rows"
        )


@dataclass
class ArchetypalMatryoshkaTopKSAEConfig(ArchetypalFields, MatryoshkaTopKSAEConfig):
    """Inference config: the plugin's nested-TopK Matryoshka encoder + archetypal dictionary."""

    @override
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

    @override
    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_archetypal_training_cfg(self)
        _validate_archetypal_matryoshka(self)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "archetypal_matryoshka_topk"


class _ArchetypalMatryoshka(ArchetypalDecoderMixin):
    """What the two archetypal Matryoshka classes share: export target and exact folds."""

    plain_sae_class: ClassVar[type[SAE[Any]]] = MatryoshkaTopKSAE
    plain_config_class: ClassVar[type[SAEConfig]] = MatryoshkaTopKSAEConfig

    @override
    def fold_W_dec_norm_is_exact(self) -> bool:
        return True  # the Matryoshka TopK ranks latents by z_i ||D_i||, which the fold leaves unchanged

    def set_decoder_norm_to_unit_norm(self) -> None:
        raise NotImplementedError("an archetypal dictionary has no free decoder rows to renormalise")


class ArchetypalMatryoshkaTopKSAE(_ArchetypalMatryoshka, MatryoshkaTopKSAE):
    """Inference Matryoshka SAE (any k at inference, ReLU by default) with D = W C + Lambda."""


class ArchetypalMatryoshkaTopKTrainingSAE(
    _ArchetypalMatryoshka, ArchetypalTrainingMixin, MatryoshkaTopKTrainingSAE
):
    """Training Matryoshka SAE (nested TopK losses) with D = W C + Lambda computed once per step."""


# ------------------------------------------------------------------------------------------------ controls
@torch.no_grad()
def init_decoder_from_candidates(
    sae: SAE[Any], candidates: torch.Tensor, init: DictionaryInit = "identity", seed: int | None = None
) -> None:
    """Start a plain SAE where an archetypal dictionary starts: the control for stability comparisons (a
    TopK SAE started from the same centroids; keep its auxiliary loss on, as SAELens's TopK does).

    Decoder: ``W_dec = W0 C`` exactly as the archetypal dictionary's D at initialisation. Encoder: tied to the
    same atoms, as SAELens ties its own initialisation (``W_enc = W_dec^T``), with column i scaled by
    1 / ||d_i||^2::

        W_enc[:, i] = d_i / ||d_i||^2,    b_enc = 0          (d_i = row i of W_dec; zero rows stay zero)

    so the pre-activation of latent i is the coefficient of the orthogonal projection of x - b_dec onto d_i,
    and ``z_i d_i`` is that projection. With ``rescale_acts_by_decoder_norm`` (SAELens's TopK default) the
    TopK ranks z_i ||d_i|| = <x - b_dec, d_i / ||d_i||>, the projection length; without it the same function
    results (the encoder's scale and the decoder's norm cancel). A random encoder instead leaves latents whose
    atom is nowhere near the rows that select them, which start (and tend to stay) dead."""
    if not isinstance(sae._parameters.get("W_dec"), nn.Parameter):
        raise TypeError("init_decoder_from_candidates needs an SAE whose W_dec is a parameter")
    validate_candidates(candidates, sae.cfg.d_in)
    W0 = initial_mixing_matrix(sae.cfg.d_sae, candidates.shape[0], init, seed, dtype=torch.float64)
    atoms = W0 @ candidates.double()
    sae.W_dec.data.copy_(atoms.to(sae.W_dec.dtype))
    sq_norms = atoms.pow(2).sum(dim=1, keepdim=True)
    encoder = torch.where(sq_norms > 0, atoms / sq_norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    sae.W_enc.data.copy_(encoder.T.to(sae.W_enc.dtype))
    b_enc = sae._parameters.get("b_enc")
    if isinstance(b_enc, nn.Parameter):
        b_enc.data.zero_()


ARCHITECTURES: list[tuple[str, type, type, type, type]] = [
    ("ra_sae", RASAE, RASAEConfig, RASAETrainingSAE, RASAETrainingSAEConfig),
    ("a_sae", ASAE, ASAEConfig, ASAETrainingSAE, ASAETrainingSAEConfig),
    (
        "archetypal_matryoshka_topk",
        ArchetypalMatryoshkaTopKSAE,
        ArchetypalMatryoshkaTopKSAEConfig,
        ArchetypalMatryoshkaTopKTrainingSAE,
        ArchetypalMatryoshkaTopKTrainingSAEConfig,
    ),
]
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
    "ArchetypalMatryoshkaTopKSAE",
    "ArchetypalMatryoshkaTopKSAEConfig",
    "ArchetypalMatryoshkaTopKTrainingSAE",
    "ArchetypalMatryoshkaTopKTrainingSAEConfig",
    "ArchetypalTrainingFields",
    "ArchetypalTrainingMixin",
    "RASAE",
    "RASAEConfig",
    "RASAETrainingSAE",
    "RASAETrainingSAEConfig",
    "init_decoder_from_candidates",
    "MIXING_UPDATES",
    "MixingUpdate",
    "initial_mixing_matrix",
    "validate_candidates",
    "validate_delta",
    "validate_mixing",
]
