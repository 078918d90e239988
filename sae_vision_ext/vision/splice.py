"""Splice SAEs into a hooked vision model: ``add_sae``, ``saes()``, ``run_with_saes``, ... (SAELens-style).

Same semantics as SAELens's ``HookedSAETransformer`` (facts from its docs and source, our own code): attaching
an SAE swaps the ``HookPoint`` at ``sae.cfg.metadata.hook_name`` for a wrapper module; the model's forward
then calls the wrapper, which returns the SAE's reconstruction

    out = decode(encode(x))                                   (use_error_term=False)
    out = decode(encode(x)) + (x - decode_clean(encode_clean(x)))   (use_error_term=True)

where the "clean" pass runs with the SAE's hooks disabled, so an intervention on ``hook_sae_acts_post``
changes the output even with the error term on, while without interventions the output equals ``x`` exactly.
The SAE's hook points appear in the model's ``hook_dict`` under ``<hook_name>.hook_sae_input``,
``.hook_sae_acts_pre``, ``.hook_sae_acts_post``, ``.hook_sae_recons``, ``.hook_sae_error``,
``.hook_sae_output``, so ``run_with_cache`` and ``run_with_hooks`` reach them.

Vision-specific: token-restricted application. An SAE trained on some token positions only (its
``cfg.metadata.token_selection``, e.g. ``"cls"`` or ``"patches"``; ``tokens=`` overrides) is applied at those
positions of the ``[B, T, d]`` activation only; every other position passes through unchanged (and takes no
part in the error term). The SAE then sees ``[B, n_selected, d]``, and so do its hooks. Pooled hooks
(``[B, d]``) are passed to the SAE whole.

Differences from SAELens, on purpose: an unknown hook name raises ``KeyError`` listing the valid names
(SAELens logs a warning and skips); a width mismatch raises ``ValueError`` naming both sizes; removing an SAE
puts back the model's ORIGINAL ``HookPoint`` object (with any permanent hooks it had) rather than a fresh one;
transcoders (``hook_name_out`` different from ``hook_name``) are not supported.

``SAESplicingMixin`` is meant to be a base of ``HookedVisionModel``
(``class HookedVisionModel(SAESplicingMixin, HookedRootModule)``); it needs from its host only ``hook_dict``,
``setup()``, ``run_with_cache``, ``run_with_hooks`` and, for token selection, ``token_layout``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from sae_vision_ext.vision.tokens import TokenSelection, check_pooled_selection, layout_of, token_positions

logger = logging.getLogger(__name__)

_WRAPPER_OWNED_HOOKS = ("hook_sae_error", "hook_sae_output")


def get_deep_attr(obj: Any, path: str) -> Any:
    """``obj.a.0.b`` for ``path = "a.0.b"`` (integer parts index sequences such as ``blocks``)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_deep_attr(obj: Any, path: str, value: Any) -> None:
    """Set the attribute at ``path`` (see :func:`get_deep_attr`) to ``value``."""
    *parents, last = path.split(".")
    for part in parents:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    if last.isdigit():
        obj[int(last)] = value
    else:
        setattr(obj, last, value)


@contextmanager
def hooks_disabled(sae: nn.Module) -> Iterator[None]:
    """Temporarily replace every hook point of ``sae`` by an identity, so encode/decode run "clean"."""
    saved = {name: get_deep_attr(sae, name) for name in getattr(sae, "hook_dict", {})}
    try:
        for name in saved:
            set_deep_attr(sae, name, nn.Identity())
        yield
    finally:
        for name, module in saved.items():
            set_deep_attr(sae, name, module)


def sae_hook_name(sae: Any) -> str:
    """The hook an SAE belongs to, from ``sae.cfg.metadata.hook_name``; raises if it is missing."""
    metadata = getattr(sae.cfg, "metadata", None)
    hook_name = getattr(metadata, "hook_name", None) if metadata is not None else None
    if not hook_name:
        raise ValueError(
            "the SAE's cfg.metadata.hook_name is not set; set it to the model hook it was trained on"
        )
    hook_name_out = getattr(metadata, "hook_name_out", None)
    if hook_name_out and hook_name_out != hook_name:
        raise NotImplementedError(
            "transcoders (hook_name_out != hook_name) are not supported by vision splicing"
        )
    return hook_name


def sae_token_selection(sae: Any) -> TokenSelection:
    """The token positions the SAE was trained on (``cfg.metadata.token_selection``; ``None`` = all)."""
    metadata = getattr(sae.cfg, "metadata", None)
    return getattr(metadata, "token_selection", None) if metadata is not None else None


class VisionSAEWrapper(nn.Module):
    """Stands in for a model ``HookPoint``: runs the SAE at the selected token positions.

    The SAE lives in ``__dict__`` (not as a submodule) and its hook points are re-attached to this wrapper, so
    the model's cache names are ``<hook_name>.hook_sae_*`` (no ``.sae.`` level), as in SAELens.
    """

    def __init__(
        self,
        sae: Any,
        original_hook: nn.Module,
        token_layout: Any = None,
        use_error_term: bool = False,
        tokens: TokenSelection = None,
    ):
        super().__init__()
        self.__dict__["_sae"] = sae
        self.__dict__["_original_hook"] = original_hook
        self.__dict__["_token_layout"] = token_layout
        for name, hook in sae.hook_dict.items():
            if name not in _WRAPPER_OWNED_HOOKS and "." not in name:
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.use_error_term = bool(use_error_term)
        self.tokens = tokens
        self.n_tokens_in_flight: int | None = None  # T of the activation being processed (read by steering)

    @property
    def sae(self) -> Any:
        return self.__dict__["_sae"]

    @property
    def original_hook(self) -> nn.Module:
        return self.__dict__["_original_hook"]

    @property
    def token_layout(self) -> Any:
        return self.__dict__["_token_layout"]

    def positions(self, n_tokens: int) -> Tensor | None:
        """Token positions the SAE is applied at for a ``[B, n_tokens, d]`` activation (``None`` = all)."""
        return token_positions(self.token_layout, self.tokens, n_tokens)

    def forward(self, original: Tensor) -> Tensor:
        self.n_tokens_in_flight = original.shape[1] if original.dim() >= 3 else None
        try:
            return self._forward(original)
        finally:
            self.n_tokens_in_flight = None

    def _forward(self, original: Tensor) -> Tensor:
        positions = None
        if original.dim() == 2:
            check_pooled_selection(self.tokens, getattr(self, "name", None))
        elif original.dim() >= 3:
            positions = self.positions(original.shape[1])
            if positions is not None:
                positions = positions.to(original.device)
        sae_in = original if positions is None else original.index_select(1, positions)
        sae_dtype = getattr(self.sae, "dtype", sae_in.dtype)
        feature_acts = self.sae.encode(sae_in.to(sae_dtype))
        sae_out = self.sae.decode(feature_acts)
        if self.use_error_term:
            with torch.no_grad(), hooks_disabled(self.sae):
                clean_out = self.sae.decode(self.sae.encode(sae_in.to(sae_dtype)))
            error = self.hook_sae_error(sae_in.to(clean_out.dtype) - clean_out)
            sae_out = sae_out + error
        sae_out = sae_out.to(original.dtype)
        if positions is None:
            out = sae_out
        else:
            out = original.clone()
            out[:, positions] = sae_out
        return self.hook_sae_output(out)


class SAESplicingMixin:
    """SAELens-style SAE splicing for a ``HookedRootModule`` whose forward calls its ``HookPoint``s."""

    def _spliced_saes(self) -> dict[str, VisionSAEWrapper]:
        wrappers = self.__dict__.get("_vision_sae_wrappers")
        if wrappers is None:
            wrappers = {}
            self.__dict__["_vision_sae_wrappers"] = wrappers
        return wrappers

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """Hook name -> SAE currently attached there."""
        return {name: wrapper.sae for name, wrapper in self._spliced_saes().items()}

    def sae_wrapper(self, hook_name: str) -> VisionSAEWrapper | None:
        """The wrapper spliced at ``hook_name``, if any."""
        return self._spliced_saes().get(hook_name)

    def add_sae(self, sae: Any, use_error_term: bool | None = None, tokens: TokenSelection = None) -> None:
        """Attach ``sae`` at ``sae.cfg.metadata.hook_name`` until :meth:`reset_saes` (replacing one there).

        ``use_error_term``: ``None`` keeps ``sae.use_error_term``. ``tokens``: positions to apply the SAE at;
        ``None`` uses ``sae.cfg.metadata.token_selection`` (itself ``None`` = all positions).
        """
        hook_name = sae_hook_name(sae)
        spliced = self._spliced_saes()
        previous = spliced.get(hook_name)
        if previous is not None:
            original = previous.original_hook
        else:
            hook_dict = getattr(self, "hook_dict", {})
            if hook_name not in hook_dict:
                valid = ", ".join(sorted(hook_dict))
                raise KeyError(f"no hook point named {hook_name!r} in this model; valid hook names: {valid}")
            original = hook_dict[hook_name]
        self._check_width(sae, hook_name)
        self._check_model_name(sae)
        effective_error_term = (
            use_error_term if use_error_term is not None else bool(getattr(sae, "use_error_term", False))
        )
        selection = tokens if tokens is not None else sae_token_selection(sae)
        wrapper = VisionSAEWrapper(
            sae,
            original_hook=original,
            token_layout=layout_of(self, hook_name),
            use_error_term=effective_error_term,
            tokens=selection,
        )
        set_deep_attr(self, hook_name, wrapper)
        spliced[hook_name] = wrapper
        self.setup()

    def _check_width(self, sae: Any, hook_name: str) -> None:
        hook_width = getattr(self, "hook_width", None)
        if hook_width is None:
            return
        try:
            width = int(hook_width(hook_name))
        except (KeyError, ValueError, AttributeError, TypeError):
            return
        d_in = int(sae.cfg.d_in)
        if width != d_in:
            raise ValueError(f"SAE d_in={d_in} does not match the width {width} of hook {hook_name!r}")

    def _check_model_name(self, sae: Any) -> None:
        sae_model = getattr(getattr(sae.cfg, "metadata", None), "model_name", None)
        cfg = getattr(self, "cfg", None)
        model_name = getattr(cfg, "model_name", None) if cfg is not None else None
        if sae_model and model_name and sae_model != model_name:
            logger.warning("SAE was trained on %r but is being attached to %r", sae_model, model_name)

    def _reset_sae(self, hook_name: str, previous: VisionSAEWrapper | None = None) -> None:
        spliced = self._spliced_saes()
        wrapper = spliced.pop(hook_name, None)
        if wrapper is None:
            logger.warning("no SAE is attached to %r; nothing to reset", hook_name)
            return
        if previous is not None:
            set_deep_attr(self, hook_name, previous)
            spliced[hook_name] = previous
        else:
            set_deep_attr(self, hook_name, wrapper.original_hook)

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs at ``act_names`` (all when ``None``), restoring the original hook points."""
        if isinstance(act_names, str):
            act_names = [act_names]
        elif act_names is None:
            act_names = list(self._spliced_saes())
        for name in act_names:
            self._reset_sae(name)
        self.setup()

    @contextmanager
    def saes(
        self,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        tokens: TokenSelection = None,
    ) -> Iterator[Any]:
        """Context manager: attach ``saes`` for the block; on exit (if ``reset_saes_end``) remove them and put
        back whatever was attached at those hooks before."""
        if not isinstance(saes, (list, tuple)):
            saes = [saes]
        to_restore: list[tuple[str, VisionSAEWrapper | None]] = []
        try:
            for sae in saes:
                hook_name = sae_hook_name(sae)
                to_restore.append((hook_name, self._spliced_saes().get(hook_name)))
                self.add_sae(sae, use_error_term=use_error_term, tokens=tokens)
            yield self
        finally:
            if reset_saes_end:
                for hook_name, previous in reversed(to_restore):
                    if hook_name in self._spliced_saes():
                        self._reset_sae(hook_name, previous)
                self.setup()

    def run_with_saes(
        self,
        *model_args: Any,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        tokens: TokenSelection = None,
        **model_kwargs: Any,
    ) -> Any:
        """One forward pass with ``saes`` attached (then removed, when ``reset_saes_end``)."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term, tokens=tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self,
        *model_args: Any,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        tokens: TokenSelection = None,
        **kwargs: Any,
    ) -> Any:
        """``run_with_cache`` with ``saes`` attached; the cache includes ``<hook>.hook_sae_*`` activations."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term, tokens=tokens):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(
        self,
        *model_args: Any,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        tokens: TokenSelection = None,
        fwd_hooks: Sequence[Any] = (),
        **kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with ``saes`` attached."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term, tokens=tokens):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), **kwargs)
