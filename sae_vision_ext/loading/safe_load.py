"""Restricted unpickling of downloaded ``.pth`` files.

Every foreign checkpoint goes through :func:`safe_torch_load`: ``torch.load(weights_only=True)`` with an
explicit allow-list. The weights-only unpickler can only build tensors, plain containers and the
globals on the list; anything else (``os.system``, ``builtins.eval``, an arbitrary class) makes it stop
before the object is built, so a crafted file cannot run code. There is no fallback to unrestricted
unpickling, whatever the file.

Allow-lists used by the plugin:

- :data:`NUMPY_SCALAR_GLOBALS` for numpy float scalars (the MSAE release stores ``target_norm`` as one).
  A pickled ``np.float64`` needs ``numpy._core.multiarray.scalar`` (``numpy.core.multiarray.scalar``
  when written by numpy 1.x), ``numpy.dtype`` and the dtype's class ``numpy.dtypes.Float64DType``.
- :func:`module_graph_globals` for whole pickled ``nn.Module`` graphs (the RA-SAE release): each
  allowed class name is bound to :class:`PickledModule`, an inert record of the pickled attributes, so
  neither torch's nor the foreign package's classes are instantiated.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked the unpickler for something outside the allow-list; nothing was executed."""


# (object, name the pickle may use for it)
NUMPY_SCALAR_GLOBALS: list[Any] = [
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
]


class PickledModule:
    """Inert stand-in for a pickled ``nn.Module`` (or any allowed class): keeps the pickled ``__dict__``.

    ``class_name`` records which class the pickle named. :meth:`state_dict` rebuilds the flat
    ``{"a.b.weight": tensor}`` mapping from the pickled ``_parameters`` / ``_buffers`` / ``_modules``.
    """

    class_name = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("_modules") or {}
        if name in modules:
            return modules[name]
        for store in ("_parameters", "_buffers"):
            if name in (self.__dict__.get(store) or {}):
                return self.__dict__[store][name]
        raise AttributeError(f"pickled {self.class_name} has no attribute {name!r}")

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for store in ("_parameters", "_buffers"):
            for name, value in (self.__dict__.get(store) or {}).items():
                if isinstance(value, torch.Tensor):
                    out[prefix + name] = value.detach()
        for name, child in (self.__dict__.get("_modules") or {}).items():
            if isinstance(child, PickledModule):
                out.update(child.state_dict(f"{prefix}{name}."))
        return out

    def __repr__(self) -> str:
        return f"PickledModule({self.class_name})"


def module_graph_globals(class_names: Iterable[str]) -> list[tuple[type, str]]:
    """Allow-list entries binding each fully qualified class name to an inert :class:`PickledModule`."""
    entries = []
    for full_name in class_names:
        stub = type(full_name.rpartition(".")[2], (PickledModule,), {"class_name": full_name})
        entries.append((stub, full_name))
    return entries


def _allowed_names(safe_globals: Iterable[Any]) -> set[str]:
    names = set()
    for entry in safe_globals:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def safe_torch_load(
    path: str | os.PathLike,
    safe_globals: Iterable[Any] = NUMPY_SCALAR_GLOBALS,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` allowing only ``safe_globals`` beyond torch's defaults.

    Raises :class:`UnsafeCheckpointError` naming the refused globals when the file needs anything else,
    ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    safe_globals = list(safe_globals)
    try:
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        message = str(err)
        refused = sorted(set(_globals_in(path)) - _allowed_names(safe_globals))
        if not refused and not any(word in message for word in ("GLOBAL", "global", "Can only build")):
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint: {_torch_reason(message)}"
            ) from None
        detail = ", ".join(refused) if refused else _torch_reason(message)
        raise UnsafeCheckpointError(
            f"refused to unpickle {path}: it needs {detail}, which is not on sae-vision-ext's allow-list "
            f"of loadable types. Nothing in the file was executed. sae-vision-ext never falls back to "
            f"unrestricted unpickling of downloaded files; if you produced this file yourself, re-save its "
            f"tensors with safetensors."
        ) from None
    except (RuntimeError, EOFError, IndexError, KeyError, TypeError, ValueError) as err:  # not a checkpoint
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None


def _globals_in(path: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: torch's own message names the global
        return []


def _torch_reason(message: str) -> str:
    """The line of torch's weights-only error that names the problem."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if any(word in line for word in ("GLOBAL", "global", "Can only build")):
            return line.partition("WeightsUnpickler error:")[2].strip() or line
        if "WeightsUnpickler error:" in line:  # the reason follows on the same line or the next one
            return line.partition("WeightsUnpickler error:")[2].strip() or " ".join(lines[i + 1 : i + 2])
    return lines[-1] if lines else "unknown error"
