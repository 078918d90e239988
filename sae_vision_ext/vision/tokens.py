"""Token positions of a vision transformer's activations, by name.

A token hook's activation is batch-first ``[B, T, d]`` with tokens ordered ``[cls?, registers...,
patches...]`` (see ``TokenLayout``). A selection names which positions an SAE or a steering hook acts on:

- ``"all"`` (also ``None`` and ``"pooled"``): every position;
- ``"cls"``: ``[0, n_cls)``; ``"registers"``: ``[n_cls, n_cls + n_registers)``;
  ``"prefix"``: ``[0, n_prefix)``;
- ``"patches"`` (also ``"spatial"``, the word for a CNN feature map's positions): ``[n_prefix, T)``;
- several names joined by ``+`` or ``,`` (``"cls+patches"``), a list of names, or a list of integer positions.

Pooled hooks (``hook_pooled``, ``hook_image_embed``) are ``[B, d]``: one vector per image, which is the CLS /
pooled token; there, ``"all"``, ``"cls"`` and ``"pooled"`` mean that vector and other selections are an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TokenSelection = str | Sequence[str] | Sequence[int] | None

_ALL = {"all", "pooled", "none", ""}
_POOLED_OK = _ALL | {"cls"}


def _names(selection: TokenSelection) -> list[str | int]:
    if selection is None:
        return ["all"]
    if isinstance(selection, str):
        return [part.strip().lower() for part in selection.replace(",", "+").split("+")]
    return [s.strip().lower() if isinstance(s, str) else int(s) for s in selection]


def selects_all(selection: TokenSelection) -> bool:
    """True when ``selection`` means every position."""
    return any(isinstance(name, str) and name in _ALL for name in _names(selection))


def token_positions(layout: Any, selection: TokenSelection, n_tokens: int) -> Tensor | None:
    """Sorted positions (LongTensor) picked by ``selection`` out of ``n_tokens``, or ``None`` for all of them.

    ``layout`` is a ``TokenLayout`` (``n_cls``, ``n_registers``, ``n_prefix``); it may be ``None`` only for
    ``"all"`` or integer positions.
    """
    names = _names(selection)
    if any(isinstance(name, str) and name in _ALL for name in names):
        return None
    chosen: set[int] = set()
    for name in names:
        if isinstance(name, int):
            if not -n_tokens <= name < n_tokens:
                raise IndexError(f"token position {name} out of range for {n_tokens} tokens")
            chosen.add(name % n_tokens)
            continue
        if layout is None:
            raise ValueError(f"token selection {name!r} needs the model's token_layout")
        n_cls = int(getattr(layout, "n_cls", 0))
        n_registers = int(getattr(layout, "n_registers", 0))
        n_prefix = int(getattr(layout, "n_prefix", n_cls + n_registers))
        if name == "cls":
            if n_cls == 0:
                raise ValueError(
                    "token selection 'cls' but this model has no CLS token (token_layout.n_cls == 0)"
                )
            chosen.update(range(0, n_cls))
        elif name in ("registers", "register"):
            chosen.update(range(n_cls, n_cls + n_registers))
        elif name == "prefix":
            chosen.update(range(0, n_prefix))
        elif name in ("patches", "patch", "spatial"):
            chosen.update(range(n_prefix, n_tokens))
        else:
            raise ValueError(
                f"unknown token selection {name!r}; use 'cls', 'patches', 'spatial', 'registers', 'prefix', "
                "'all' or integer positions"
            )
    if not chosen:
        raise ValueError(f"token selection {selection!r} picks no token out of {n_tokens}")
    return torch.tensor(sorted(chosen), dtype=torch.long)


def layout_of(model: Any, hook_name: str) -> Any:
    """The token layout of the activation at ``hook_name``: ``model.layout_at(hook_name)`` where layouts
    differ per hook (CNN feature maps), else ``model.token_layout``; None for pooled hooks or a model
    without one."""
    layout_at = getattr(model, "layout_at", None)
    if layout_at is None:
        return getattr(model, "token_layout", None)
    is_token_hook = getattr(model, "is_token_hook", None)
    if is_token_hook is not None and not is_token_hook(hook_name):
        return None
    return layout_at(hook_name)


def check_pooled_selection(selection: TokenSelection, hook_name: str | None = None) -> None:
    """Raise when ``selection`` asks for token positions of a pooled ``[B, d]`` activation."""
    for name in _names(selection):
        if isinstance(name, int) or name not in _POOLED_OK:
            where = f" at {hook_name!r}" if hook_name else ""
            raise ValueError(
                f"the activation{where} is pooled ([batch, d], one vector per image); token selection "
                f"{selection!r} does not apply (use 'all' or 'cls')"
            )
