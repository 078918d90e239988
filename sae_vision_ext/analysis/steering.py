"""Steering a vision model with SAE latents: add a decoder direction, clamp, scale or ablate latents.

For activations ``x`` at the SAE's hook (only at the chosen token positions), latents ``z = encode(x)`` and an
edited copy ``z'``:

- ``mode="add"``:    ``x' = x + sum_i value_i * d_i``  with ``d_i = decode(e_i) - decode(0)`` the latent's
  decoder atom in the model's activation space (``W_dec[i]`` for a plain linear decoder; the standardisation
  of SAEs that rescale their inputs is undone by going through ``decode``);
- ``mode="clamp"``:  ``z'_i = value_i``;  ``mode="scale"``: ``z'_i = value_i * z_i``;  ``mode="ablate"``:
  ``z'_i = 0``; then ``x' = x + decode(z') - decode(z)``, which keeps the SAE's reconstruction error ``x -
  decode(z)`` in place: only what the SAE explains is edited.

``steer(model, sae, ...)`` is a context manager around any hooked model (``HookedVisionModel``, a
``HookedRootModule``). When the SAE is spliced into the model (``model.add_sae``), the edit is applied to the
spliced SAE's ``hook_sae_acts_post`` instead (``add`` then adds ``value`` to the latent), so it composes with
SAELens-style error terms; token positions the spliced SAE does not cover are left alone. When a DIFFERENT SAE
is spliced at the hook, the edit applies to that SAE's output (``hook_sae_output``). Pooled hooks (``[B, d]``,
e.g. ``hook_image_embed``) are edited whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_vision_ext.vision.splice import hooks_disabled, sae_hook_name
from sae_vision_ext.vision.tokens import TokenSelection, check_pooled_selection, layout_of, token_positions

MODES = ("add", "clamp", "scale", "ablate")


def _as_latent_list(latents: int | Sequence[int] | Tensor) -> list[int]:
    if isinstance(latents, Tensor):
        return [int(i) for i in latents.flatten().tolist()]
    if isinstance(latents, int):
        return [latents]
    return [int(i) for i in latents]


def _as_values(value: float | Sequence[float] | Tensor | None, n: int, mode: str) -> Tensor:
    if mode == "ablate":
        return torch.zeros(n)
    if value is None:
        raise ValueError(f"mode={mode!r} needs a value")
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() == 1:
        values = values.expand(n)
    if values.numel() != n:
        raise ValueError(f"got {values.numel()} values for {n} latents")
    return values.clone()


def _dense(z: Tensor) -> Tensor:
    return z.to_dense() if z.is_sparse else z


def _sae_dtype(sae: Any, fallback: torch.dtype) -> torch.dtype:
    dtype = getattr(sae, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else fallback


def latent_directions(sae: Any, latents: int | Sequence[int] | Tensor) -> Tensor:
    """Decoder atoms in the SAE's input space, ``d_i = decode(e_i) - decode(0)``, as ``[n_latents, d_in]``.

    Exact for any affine decoder, including SAEs that standardise their inputs and undo it in ``decode``
    (there ``d_i`` is the atom mapped back to raw activation space). Falls back to ``W_dec[i]`` when
    ``decode`` needs per-input state (``constant_norm_rescale`` / ``layer_norm`` SAELens normalisation).
    """
    index = torch.as_tensor(_as_latent_list(latents), dtype=torch.long)
    d_sae = int(sae.cfg.d_sae)
    if index.numel() and (index.min() < 0 or index.max() >= d_sae):
        raise IndexError(f"latent index out of range for d_sae={d_sae}: {index.tolist()}")
    normalisation = getattr(sae.cfg, "normalize_activations", "none")
    with torch.no_grad():
        if normalisation in ("constant_norm_rescale", "layer_norm") and hasattr(sae, "W_dec"):
            return sae.W_dec.detach()[index].clone()
        param = next(iter(sae.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = _sae_dtype(sae, param.dtype if param is not None else torch.float32)
        basis = torch.zeros(index.numel() + 1, d_sae, device=device, dtype=dtype)
        basis[torch.arange(1, index.numel() + 1), index.to(device)] = 1.0
        with hooks_disabled(sae):
            decoded = sae.decode(basis)
        return (decoded[1:] - decoded[:1]).detach()


def edit_latents(z: Tensor, latents: Sequence[int] | Tensor, mode: str, values: Tensor) -> Tensor:
    """Return a copy of ``z`` ([..., d_sae]) with ``latents`` clamped / scaled / ablated / incremented."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    z = _dense(z).clone()
    index = torch.as_tensor(_as_latent_list(latents), dtype=torch.long, device=z.device)
    values = values.to(device=z.device, dtype=z.dtype)
    if mode == "clamp":
        z[..., index] = values.expand(*z.shape[:-1], -1)
    elif mode == "scale":
        z[..., index] = z[..., index] * values
    elif mode == "ablate":
        z[..., index] = 0
    else:  # add
        z[..., index] = z[..., index] + values
    return z


def steer_vectors(
    sae: Any,
    x: Tensor,
    latents: int | Sequence[int] | Tensor,
    mode: str = "add",
    value: float | Sequence[float] | Tensor | None = 1.0,
) -> Tensor:
    """Steer activation rows ``x`` ([..., d_in]) as described in the module docstring; returns ``x'``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    latent_list = _as_latent_list(latents)
    values = _as_values(value, len(latent_list), mode)
    with torch.no_grad():
        if mode == "add":
            directions = latent_directions(sae, latent_list)
            shift = (values.to(directions) @ directions).to(x.dtype)
            return x + shift
        sae_x = x.to(_sae_dtype(sae, x.dtype))
        with hooks_disabled(sae):
            z = _dense(sae.encode(sae_x))
            z_edit = edit_latents(z, latent_list, mode, values)
            delta = sae.decode(z_edit) - sae.decode(z)
        return x + delta.to(x.dtype)


@dataclass
class SteeringHandle:
    """What ``steer`` attached: the hook name it edits and whether it went through a spliced SAE."""

    hook_name: str
    spliced: bool
    latents: list[int]
    mode: str
    values: Tensor


def _hook_point(model: Any, name: str) -> Any:
    hook_dict = getattr(model, "hook_dict", {})
    if name not in hook_dict:
        valid = ", ".join(sorted(hook_dict))
        raise KeyError(f"no hook point named {name!r} in this model; valid hook names: {valid}")
    return hook_dict[name]


@contextmanager
def steer(
    model: Any,
    sae: Any,
    latents: int | Sequence[int] | Tensor,
    mode: str = "add",
    value: float | Sequence[float] | Tensor | None = 1.0,
    tokens: TokenSelection = "all",
    hook_name: str | None = None,
) -> Iterator[SteeringHandle]:
    """Context manager: every forward pass of ``model`` inside the block is steered.

    ``latents``: one index or several; ``value``: one number or one per latent (ignored for ``"ablate"``);
    ``tokens``: ``"cls"``, ``"patches"``, ``"registers"``, ``"all"`` or positions (see ``vision.tokens``);
    ``hook_name`` defaults to ``sae.cfg.metadata.hook_name``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    hook_name = hook_name or sae_hook_name(sae)
    latent_list = _as_latent_list(latents)
    d_sae = int(sae.cfg.d_sae)
    bad = [i for i in latent_list if not 0 <= i < d_sae]
    if bad:
        raise IndexError(f"latents {bad} out of range for d_sae={d_sae}")
    values = _as_values(value, len(latent_list), mode)
    layout = layout_of(model, hook_name)
    wrapper_of = getattr(model, "sae_wrapper", None)
    wrapper = wrapper_of(hook_name) if wrapper_of is not None else None
    spliced = wrapper is not None and wrapper.sae is sae

    if spliced:
        target = _hook_point(model, f"{hook_name}.hook_sae_acts_post")

        def hook_fn(acts: Tensor, hook: Any) -> Tensor:
            acts = _dense(acts)
            if acts.dim() == 2:
                check_pooled_selection(tokens, hook_name)
                return edit_latents(acts, latent_list, mode, values)
            n_tokens = wrapper.n_tokens_in_flight or acts.shape[1]
            sae_positions = wrapper.positions(n_tokens)
            wanted = token_positions(layout, tokens, n_tokens)
            if wanted is None:
                return edit_latents(acts, latent_list, mode, values)
            if sae_positions is None:
                local = wanted
            else:
                lookup = {int(p): j for j, p in enumerate(sae_positions.tolist())}
                local = torch.tensor([lookup[p] for p in wanted.tolist() if p in lookup], dtype=torch.long)
            if local.numel() == 0:
                return acts
            local = local.to(acts.device)
            out = acts.clone()
            out[:, local] = edit_latents(acts[:, local], latent_list, mode, values)
            return out

    else:
        # another SAE spliced at this hook: steer what it hands downstream
        target_name = f"{hook_name}.hook_sae_output" if wrapper is not None else hook_name
        target = _hook_point(model, target_name)

        def hook_fn(acts: Tensor, hook: Any) -> Tensor:
            if acts.dim() == 2:
                check_pooled_selection(tokens, hook_name)
                return steer_vectors(sae, acts, latent_list, mode, values)
            positions = token_positions(layout, tokens, acts.shape[1])
            if positions is None:
                return steer_vectors(sae, acts, latent_list, mode, values)
            positions = positions.to(acts.device)
            out = acts.clone()
            out[:, positions] = steer_vectors(sae, acts[:, positions], latent_list, mode, values)
            return out

    target.add_hook(hook_fn, dir="fwd")
    handle = target.fwd_hooks[-1]
    try:
        yield SteeringHandle(
            hook_name=hook_name, spliced=spliced, latents=latent_list, mode=mode, values=values
        )
    finally:
        handle.hook.remove()
        if handle in target.fwd_hooks:
            target.fwd_hooks.remove(handle)
