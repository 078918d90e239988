"""Images -> the model's own preprocessing -> hooked capture -> token selection -> rows per hook.

One forward pass (``run_with_cache`` with ``stop_at_layer`` = one past the deepest block hook) feeds every
hook. Token selection keeps, per image, ``cls`` | ``registers`` | ``prefix`` | ``patches`` | ``all`` tokens of
a token hook ``[B, T, d]``; ``pooled`` / ``embed`` name the one-vector-per-image hooks ``hook_pooled`` /
``hook_image_embed``. Rows are ``[B * n_selected, d]``, image-major, identical in order for every hook.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_vision_ext.activations.images import PositionedImages, image_batches, open_images
from sae_vision_ext.activations.options import (  # noqa: F401  (re-exported)
    ALL_SELECTIONS,
    POOLED_SELECTIONS,
    TOKEN_SELECTIONS,
    resolve_hooks,
)
from sae_vision_ext.vision.tokens import layout_of

logger = logging.getLogger(__name__)

# run_with_cache adds hooks to the model's shared HookPoints: two threads must not run one model at once.
_FORWARD_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FORWARD_LOCKS_GUARD = threading.Lock()


def forward_lock(model: Any) -> threading.Lock:
    """The lock that serialises hooked forward passes of ``model`` across threads."""
    with _FORWARD_LOCKS_GUARD:
        lock = _FORWARD_LOCKS.get(model)
        if lock is None:
            lock = _FORWARD_LOCKS[model] = threading.Lock()
        return lock


def stop_layer_for(hook_names: list[str], model: Any = None) -> int | None:
    """``stop_at_layer`` that still computes every hook: one past the deepest block (a CNN: stage), None
    for a full pass. ``model.layer_of`` places each hook; without a model, ViT names are read."""
    layers = []
    for name in hook_names:
        if model is not None and hasattr(model, "layer_of"):
            layer = model.layer_of(name)
        elif name == "hook_embed":
            layer = -1
        else:
            match = re.match(r"blocks\.(\d+)\.", name)
            layer = int(match.group(1)) if match else None
        if layer is None:
            return None
        layers.append(layer)
    return max(layers) + 1 if layers else None


def is_token_hook(model: Any, hook_name: str) -> bool:
    if hasattr(model, "is_token_hook"):
        return bool(model.is_token_hook(hook_name))
    return hook_name not in POOLED_SELECTIONS.values()


def tokens_per_image(model: Any, hook_name: str, token_selection: str) -> int:
    """Rows each image gives at ``hook_name`` under ``token_selection``."""
    if not is_token_hook(model, hook_name):
        return 1
    if token_selection in POOLED_SELECTIONS:
        raise ValueError(
            f"{hook_name!r} is a token hook; token_selection {token_selection!r} needs a pooled hook"
        )
    layout = layout_of(model, hook_name)
    return len(range(layout.n_tokens)[layout.token_slice(token_selection)])


def select_rows(model: Any, acts: torch.Tensor, hook_name: str, token_selection: str) -> torch.Tensor:
    """``[B, T, d]`` (token hook) or ``[B, d]`` (pooled) -> rows ``[B * n, d]`` of the selected tokens."""
    if acts.dim() == 2:
        return acts
    if token_selection in POOLED_SELECTIONS:
        raise ValueError(
            f"{hook_name!r} gives tokens {list(acts.shape)}; token_selection {token_selection!r} "
            "needs hook_pooled or hook_image_embed"
        )
    selected = layout_of(model, hook_name).select(acts, token_selection)
    return selected.reshape(-1, selected.shape[-1])


@dataclass
class Chunk:
    """Activation rows of the images at positions ``[start, end)`` (the readable ones, in order)."""

    start: int
    end: int
    rows: dict[str, torch.Tensor]
    n_images_ok: int
    n_images_failed: int
    extra: dict[str, Any] = field(default_factory=dict)


class ImageActivationSource:
    """Turns an image collection into per-hook activation rows with one forward pass per image batch.

    ``images``: a collection (see :mod:`~sae_vision_ext.activations.images`); ``preprocess``: the model's own
    transform (PIL -> ``[3, H, W]``). Image decoding, augmentation and preprocessing run in ``num_workers``
    DataLoader processes; the forward pass in the calling thread (the stores move it to a background thread).
    """

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        images: Any,
        hook_names: str | list[str],
        token_selection: str = "patches",
        model_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        augment: str = "none",
        crop_scale: tuple[float, float] = (0.35, 1.0),
        shuffle: bool = True,
        dtype: torch.dtype = torch.float32,
        autocast: bool = False,
    ):
        self.model = model
        self.hook_names = resolve_hooks(hook_names, token_selection)
        self.token_selection = token_selection
        for name in self.hook_names:
            model.hook_width(name)  # raises, listing valid names, for an unknown hook
        self.hook_widths = {name: int(model.hook_width(name)) for name in self.hook_names}
        counts = {name: tokens_per_image(model, name, token_selection) for name in self.hook_names}
        if len(set(counts.values())) != 1:
            raise ValueError(
                f"hooks give different numbers of rows per image under {token_selection!r}: {counts}"
            )
        self.tokens_per_image = next(iter(counts.values()))
        self.stop_at_layer = stop_layer_for(self.hook_names, model)
        self.model_batch_size = int(model_batch_size)
        self.num_workers = int(num_workers)
        self.dtype = dtype
        self.autocast = autocast
        self.dataset = PositionedImages(
            open_images(images),
            preprocess,
            seed=seed,
            augment=augment,
            crop_scale=crop_scale,
            shuffle=shuffle,
        )
        self.forward_seconds = 0.0
        self.n_failed = 0
        self.n_ok = 0
        self.failures: list[str] = []

    @property
    def n_images(self) -> int:
        """Images in one epoch of the collection."""
        return len(self.dataset)

    @torch.no_grad()  # not inference_mode: the rows become training inputs, which autograd may save
    def activations(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``[B * n, d]`` per hook for a batch of preprocessed images (on the CPU, in ``self.dtype``)."""
        started = time.perf_counter()
        model_device = next(self.model.parameters()).device
        model_dtype = next(self.model.parameters()).dtype
        pixels = pixels.to(model_device, model_dtype)
        autocast = torch.autocast(device_type=model_device.type, dtype=torch.bfloat16, enabled=self.autocast)
        with forward_lock(self.model), autocast:
            _, cache = self.model.run_with_cache(
                pixels, names_filter=list(self.hook_names), stop_at_layer=self.stop_at_layer
            )
        rows = {
            name: select_rows(self.model, cache[name], name, self.token_selection).to("cpu", self.dtype)
            for name in self.hook_names
        }
        self.forward_seconds += time.perf_counter() - started
        return rows

    def iter_chunks(
        self, start: int = 0, end: int | None = None, boundary: int | None = None
    ) -> Iterator[Chunk]:
        """Chunks for positions ``[start, end)`` (forever if ``end`` is None); none crosses a ``boundary``
        multiple.

        The DataLoader (and its worker processes) is created here, in the calling thread; iterate anywhere.
        """
        batches = image_batches(
            self.dataset,
            start,
            self.model_batch_size,
            end=end,
            boundary=boundary,
            num_workers=self.num_workers,
        )
        return self._chunks(batches)

    def _chunks(self, batches: Iterator[Any]) -> Iterator[Chunk]:
        for batch in batches:
            self._record_failures(batch)
            if batch.pixels is None:
                rows = {
                    name: torch.empty(0, width, dtype=self.dtype) for name, width in self.hook_widths.items()
                }
                n_ok = 0
            else:
                rows = self.activations(batch.pixels)
                n_ok = batch.pixels.shape[0]
            yield Chunk(batch.start, batch.end, rows, n_ok, batch.n_failed)

    def _record_failures(self, batch: Any) -> None:
        """Count unreadable images; give up only when nothing at all can be read."""
        n_ok = 0 if batch.pixels is None else batch.pixels.shape[0]
        self.n_ok += n_ok
        self.n_failed += batch.n_failed
        for error in batch.errors:
            if len(self.failures) < 20:
                self.failures.append(error)
                logger.warning("skipping an unreadable image (%s)", error)
        if self.n_ok == 0 and self.n_failed >= max(32, 2 * self.model_batch_size):
            raise RuntimeError(
                f"none of the first {self.n_failed} images could be read; first error: {self.failures[0]}"
            )
