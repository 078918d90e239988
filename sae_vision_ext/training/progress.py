"""What a training run shows: its progress bar (with the guard against non-finite rows and steps) and its
summary (:class:`TrainingResult`).

:class:`ProgressProvider` sits between the row store and SAELens's trainer: each ``next()`` hands out the next
batch without its non-finite rows, moves the bar (rows, rows/s) and, at most once a second, refreshes its
postfix (loss, MSE, L0, dead fraction from ``TrainingMonitor.postfix``; images read and skipped). It also
reads the previous step's health (loss and weights finite) in the same host sync.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_vision_ext.errors import UserError
from sae_vision_ext.training.monitor import per_k_table
from sae_vision_ext.vision.load import describe_weights

RANDOM_WEIGHTS_BANNER = (
    "!! The vision model had RANDOM weights: the SAE's latents describe a random network, not learned "
    "features.\n!! For a real run give pretrained weights (the default when the Hugging Face Hub is "
    "reachable) or --weights FILE."
)


class NonFiniteTrainingError(UserError):
    """A training step produced a non-finite loss or weight; the run stopped without saving that SAE."""


class ProgressProvider:
    """Shows rows/s as training advances (reads the trainer's sample count), then hands out the next batch.

    The postfix (refreshed at most once a second) is ``status()`` (``TrainingMonitor.postfix``: loss, MSE, L0,
    dead fraction) plus the images read and skipped when training from images.
    """

    def __init__(
        self,
        provider: Any,
        total: int,
        samples_fn,
        counters: dict[str, int],
        enabled: bool = True,
        status=None,
        health=None,
    ):
        self.provider = provider
        self.samples_fn = samples_fn
        self.counters = counters
        self.status = status
        # health(): a scalar tensor, non-finite when the last step's loss or weights were (None: no step yet);
        # read together with the batch's count of non-finite rows: one host sync per step
        self.health = health
        self.skipped_in_batch = 0  # non-finite rows left out of the last batch handed out
        self.non_finite_rows = 0  # all of this run's (a resumed run starts from the checkpoint's count)
        self.bar = tqdm(
            total=total,
            initial=samples_fn(),
            unit="rows",
            unit_scale=True,
            desc="training SAE",
            disable=not enabled,
            mininterval=0.5,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._last_postfix = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._finite_batch()
        done = self.samples_fn()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if time.monotonic() - self._last_postfix > 1.0:
            self._show_postfix()
        return batch

    def _finite_batch(self):
        """The next batch without its non-finite rows (NaN, inf, or a squared norm that overflows float32, as
        one 1e30 value does), counted in ``non_finite_rows``; a batch with no finite row is skipped whole.
        Raises :class:`NonFiniteTrainingError` when the previous step left a non-finite loss or weight."""
        skipped = 0
        while True:
            batch = next(self.provider)
            parts = list(batch.values()) if isinstance(batch, dict) else [batch]
            bad = None
            for part in parts:  # a row is dropped from every hook when it is bad at one
                row_bad = ~torch.isfinite(part.float().square().sum(-1))
                bad = row_bad if bad is None else bad | row_bad.to(bad.device)
            health = self.health() if self.health is not None else None
            n_bad, healthy = _read_scalars(bad.sum(), health)
            if not healthy:
                raise NonFiniteTrainingError(
                    "a training step gave a non-finite loss or weight"
                )  # worded by the runner
            if n_bad:
                keep = ~bad
                batch = (
                    {h: t[keep.to(t.device)] for h, t in batch.items()}
                    if isinstance(batch, dict)
                    else batch[keep]
                )
                skipped += n_bad
                self.non_finite_rows += n_bad
            if n_bad < bad.shape[0]:
                self.skipped_in_batch = skipped
                return batch

    def _show_postfix(self):
        if self.bar.disable:
            return
        self._last_postfix = time.monotonic()
        parts = [self.status()] if self.status is not None else []
        if "images_ok" in self.counters:
            parts.append(f"images={self.counters['images_ok']} skipped={self.counters['images_failed']}")
        text = " ".join(p for p in parts if p)
        if text:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self, final: int | None = None):
        self._show_postfix()  # the bar's last line shows the last values
        if final is not None and final > self.bar.n:
            self.bar.update(final - self.bar.n)
        self.bar.close()


def _read_scalars(count: torch.Tensor, health: torch.Tensor | None) -> tuple[int, bool]:
    """``(count, health is finite)`` in one host sync (two when the tensors live on different devices)."""
    if health is None:
        return int(count), True
    if health.device == count.device:
        n, h = torch.stack([count.float(), health.float()]).tolist()
        return int(n), math.isfinite(h)
    return int(count), math.isfinite(float(health))


@dataclass
class TrainingResult:
    """What a run produced: the trained SAE(s) by hook, where they were written, and their metrics."""

    saes: dict[str, Any]
    output_path: Path
    sae_paths: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    n_training_rows: int
    seconds: float
    interrupted: bool = False
    checkpoint: Path | None = None
    counters: dict[str, int] = field(default_factory=dict)
    weights: dict[str, Any] | None = (
        None  # vision.load.weights_record of the model (None: trained from a cache)
    )
    eval_source: str = ""
    metrics_log: Path | None = None  # metrics.jsonl (training.monitor)
    plots: list[Path] = field(default_factory=list)  # training_curves.png, fvu_vs_k.png
    rows_this_run: int | None = None  # rows trained by this call (less than n_training_rows after a resume)

    @property
    def sae(self):
        return next(iter(self.saes.values()))

    def _rows_line(self) -> str:
        """Rows and rows/s, the rate over the rows this call trained (never a division by ~0 seconds)."""
        total, new = (
            self.n_training_rows,
            self.n_training_rows if self.rows_this_run is None else self.rows_this_run,
        )
        rate = f"{new / self.seconds:,.0f} rows/s" if new > 0 and self.seconds >= 1e-3 else ""
        if new <= 0:
            return f"trained on {total:,} rows (none in this run: the checkpoint was at the end)"
        if new == total:
            return f"trained on {total:,} rows in {self.seconds:.1f} s" + (f" ({rate})" if rate else "")
        return f"trained on {total:,} rows ({new:,} of them in this run, {self.seconds:.1f} s" + (
            f", {rate})" if rate else ")"
        )

    def summary(self) -> str:
        lines = []
        if self.interrupted:
            lines.append(f"interrupted after {self.n_training_rows:,} rows; checkpoint: {self.checkpoint}")
            lines.append("resume with the same command plus --resume (or resume_from_checkpoint='latest')")
            if self.metrics_log is not None:
                lines.append(f"training curve so far: {self.metrics_log}")
            return "\n".join(lines)
        lines.append(self._rows_line())
        if self.counters.get("non_finite_rows"):
            lines.append(
                f"non-finite input rows skipped: {self.counters['non_finite_rows']:,} (NaN, inf or too "
                "large; they count in the rows above)"
            )
        if "images_ok" in self.counters:
            lines.append(
                f"images: {self.counters['images_ok']:,} read, {self.counters['images_failed']:,} skipped"
            )
        if self.weights:
            lines.append(f"model weights: {describe_weights(self.weights)}")
            if self.weights.get("source") == "random-init":
                lines.append(RANDOM_WEIGHTS_BANNER)
        for hook, path in self.sae_paths.items():
            lines.append(f"SAE for {hook}: {path}")
            m = self.metrics.get(hook)
            if m:
                lines.append(
                    f"  {self.eval_source} ({m['n_rows']:,} rows): FVU {m['fvu']:.4f} | "
                    f"cosine {m['cosine']:.4f} | L0 {m['l0']:.1f} of {m['d_sae']} "
                    f"(zeros {m['fraction_zero']:.1%})"
                )
                if "dead_fraction_train" in m:
                    lines.append(
                        "  dead latents (firing rate < 10^-5.5 over the last "
                        f"{m['dead_window_rows']:,} training rows): {m['dead_fraction_train']:.1%}"
                    )
                if m.get("per_k"):
                    lines.append(f"  at each k of the Matryoshka levels (same {m['n_rows']:,} rows):")
                    lines.extend(per_k_table(m["per_k"], indent="    "))
        if self.metrics_log is not None:
            lines.append(f"training curve: {self.metrics_log}")
        if self.plots:
            lines.append("plots: " + ", ".join(str(p) for p in self.plots))
        return "\n".join(lines)
