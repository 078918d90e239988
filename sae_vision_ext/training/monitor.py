"""Training you can watch: each step's loss, MSE (per Matryoshka level), L0 and dead fraction, without wandb.

How steps are observed: ``SAETrainer.step(batch) -> TrainStepOutput`` is the public seam that SAELens's
``SAETrainer.fit`` calls once per step, and that ``MultiSAETrainer.fit`` calls on each of its per-hook
``SAETrainer`` s. :class:`TrainingMonitor` replaces ``step`` on each trainer *instance* by a wrapper that
calls the original and then reads the returned ``TrainStepOutput`` (``loss`` and its parts ``losses``) and
the counters the trainer keeps for its sparsity statistics: ``act_freq_scores`` (per-latent firing counts; the
step's L0 is their increase over the step's rows) and ``n_forward_passes_since_fired`` (dead latents). No
SAELens class is changed or subclassed, no private method is overridden, wandb logging is untouched, and the
same code serves one hook and several. (Alternatives: a subclass would not reach the per-hook trainers that
``MultiSAETrainer`` builds itself; ``_update_pbar`` and ``_log_train_step`` are private and the latter only
runs with wandb on.)

Cost: per step a few small on-device ops ([d_sae] vectors and scalars: no pass over the [batch, d_sae]
latents, no host sync). Values reach the host only when a record is written (every ``every`` steps) or the
bar's postfix is refreshed (at most once a second), in one transfer each time.

Outputs, in the run's output folder (one file for all hooks; every record names its hook):

- ``metrics.jsonl``: one JSON object per hook every ``every`` steps (default: about 200 records per run, every
  step for short runs), each line flushed as written, so an interrupted run keeps its curve. Fields: ``step``,
  ``rows``, ``hook``, ``lr``, ``loss``, ``mse`` (``mse_loss``; for Matryoshka SAEs the largest-k level),
  ``mse_per_k`` (Matryoshka SAEs: ``{"k": loss}``; ``mse_kind`` says "nmse" when the SAE trains on normalised
  MSE), ``losses`` (every loss part the SAE reports), ``l0`` (mean non-zero latents per row),
  ``dead_fraction`` (latents that did not fire in the last ``min(dead_feature_window, step)`` steps),
  ``rows_per_s``, ``wall_s`` (training seconds, continued across resumes) and ``steps_averaged``. Values are
  means over the steps since the previous record; non-finite values are written as ``null``. On resume the
  file keeps the records up to the resumed step (the rest of the earlier attempt is dropped, atomically) and
  new records are appended.
- ``training_curves.png`` (loss, MSE, L0, dead fraction against rows) and, for Matryoshka SAEs (a cfg with
  ``k_levels``), ``fvu_vs_k.png`` (held-out FVU at each k, log-x): :meth:`TrainingMonitor.write_plots`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "training_curves.png"
FVU_VS_K_FILENAME = "fvu_vs_k.png"
RECORDS_PER_RUN = 200
POSTFIX_CHARS = 80
_LEVEL_LOSS = re.compile(r"^(n?mse)_loss_k(\d+)$")


def default_every(total_steps: int, records: int = RECORDS_PER_RUN) -> int:
    """Steps between two records: about ``records`` records per run, every step for runs shorter than that."""
    return max(1, total_steps // records)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, as a killed run may leave, is skipped)."""
    records = []
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ----------------------------------------------------------------------------------------------- per step


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().to(device)
    return torch.tensor(float(value), device=device)


class _RunningMean:
    """Sums of per-step value vectors, kept on the device; :meth:`take` returns the means, starts over."""

    def __init__(self):
        self.names: tuple[str, ...] = ()
        self.total: torch.Tensor | None = None
        self.n = 0

    def add(self, names: tuple[str, ...], values: torch.Tensor) -> None:
        if names != self.names or self.total is None:  # the loss parts changed: start a new sum
            self.names, self.total, self.n = names, torch.zeros_like(values), 0
        self.total += values
        self.n += 1

    def take(self, **now: torch.Tensor) -> dict[str, float | None]:
        """Means since the last call, plus the ``now`` values, in one device -> host copy; {} if no step."""
        if not self.n:
            return {}
        values = torch.cat(
            [self.total / self.n, *(v.reshape(1).to(self.total) for v in now.values())]
        ).tolist()
        self.total.zero_()
        self.n = 0
        return {name: (v if math.isfinite(v) else None) for name, v in zip(self.names + tuple(now), values)}


def _dead_fraction(trainer: Any, steps_done: int) -> torch.Tensor:
    """Latents silent in the last ``min(dead_feature_window, steps_done)`` steps (from SAELens's counter)."""
    window = max(1, min(int(trainer.cfg.dead_feature_window), steps_done))
    return (trainer.n_forward_passes_since_fired >= window).float().mean()


def _fields(means: dict[str, float | None]) -> dict[str, Any]:
    """Record fields from the named means: loss, mse (+ per level), the loss parts, l0, dead fraction."""
    out: dict[str, Any] = {"loss": means.get("loss")}
    per_k, kind = {}, "mse"
    for name, value in means.items():
        match = _LEVEL_LOSS.match(name)
        if match:
            kind, per_k[int(match.group(2))] = match.group(1), value
    if per_k:
        out["mse"] = per_k[max(per_k)]
        out["mse_per_k"] = {str(k): per_k[k] for k in sorted(per_k)}
        if kind != "mse":
            out["mse_kind"] = kind
    elif "mse_loss" in means:
        out["mse"] = means["mse_loss"]
    out["losses"] = {n: v for n, v in means.items() if n not in ("loss", "l0", "dead_fraction")}
    out["l0"] = means.get("l0")
    out["dead_fraction"] = means.get("dead_fraction")
    return out


def _g(value: float | None) -> str:
    return "nan" if value is None else f"{value:.3g}"


def _postfix_text(fields: dict[str, Any], short: bool) -> str:
    text = f"loss={_g(fields['loss'])}"
    per_k, kind = fields.get("mse_per_k"), fields.get("mse_kind", "mse")
    if per_k and short:
        first, last = next(iter(per_k)), list(per_k)[-1]
        text += f" {kind}@{first}..{last}={_g(per_k[first])}..{_g(per_k[last])}"
    elif per_k:
        text += f" {kind}" + " ".join(f"@{k}={_g(v)}" for k, v in per_k.items())
    elif "mse" in fields:
        text += f" mse={_g(fields['mse'])}"
    l0, dead = fields["l0"], fields["dead_fraction"]
    text += f" L0={'nan' if l0 is None else f'{l0:.1f}'} dead={'nan' if dead is None else f'{dead:.1%}'}"
    return text


class _Watch:
    """One hook's trainer and its running sums."""

    def __init__(self, hook: str, trainer: Any):
        self.hook = hook
        self.trainer = trainer
        self.record = _RunningMean()
        self.bar = _RunningMean()
        self.lr = float("nan")
        self.step = 0
        self.rows = 0
        self.last_rows: int | None = None
        self.last_time = 0.0


class TrainingMonitor:
    """Watches the ``SAETrainer`` s of a run (``{hook: trainer}``); writes ``metrics.jsonl`` (see module).

    ``total_rows``: the run's training rows (the step that reaches them is always recorded); ``every``: steps
    between records (default :func:`default_every`); ``resumed_step``: the step a resumed run starts from
    (None: a new run, which starts a new file); ``live``: keep the sums the bar's :meth:`postfix` shows.
    """

    def __init__(
        self,
        output_path: str | os.PathLike,
        trainers: dict[str, Any],
        total_rows: int,
        batch_rows: int,
        every: int | None = None,
        resumed_step: int | None = None,
        live: bool = True,
    ):
        self.output_path = Path(output_path)
        self.output_path.mkdir(parents=True, exist_ok=True)
        self.path = self.output_path / METRICS_FILENAME
        self.total_rows = int(total_rows)
        self.every = every or default_every(math.ceil(total_rows / batch_rows))
        self.live = live
        self.wall_offset = self._start_file(resumed_step)
        self.file = open(self.path, "a")
        self.started: float | None = None
        self.last_postfix = ""
        self.watches = {hook: _Watch(hook, trainer) for hook, trainer in trainers.items()}
        for watch in self.watches.values():
            self._wrap(watch)

    def _start_file(self, resumed_step: int | None) -> float:
        """New run: an empty file. Resumed run: keep the records up to ``resumed_step`` (atomic rewrite).
        Returns the wall seconds already spent (the last kept record's)."""
        kept = (
            [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step] if resumed_step else []
        )
        tmp = self.path.with_name(f".{METRICS_FILENAME}.{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        return max((r.get("wall_s") or 0.0 for r in kept), default=0.0)

    def _wrap(self, watch: _Watch) -> None:
        original = watch.trainer.step  # bound now, so a method patched on the class before this is kept

        def step(batch):
            now = time.perf_counter()
            if self.started is None:
                self.started = now
            if watch.last_rows is None:
                watch.last_rows, watch.last_time = watch.trainer.n_training_samples, now
            watch.lr = watch.trainer.optimizer.param_groups[0]["lr"]  # the lr this step uses
            rows_before = watch.trainer.n_training_samples
            with torch.no_grad():
                fired_before = watch.trainer.act_freq_scores.clone()
            output = original(batch)
            with torch.no_grad():
                # L0 from SAETrainer's own per-latent firing counts, to which step() adds this batch's:
                # a [d_sae] difference of integer counts, not a second pass over the [batch, d_sae] latents
                fired = (watch.trainer.act_freq_scores - fired_before).sum()
            self._observe(watch, output, fired / max(1, watch.trainer.n_training_samples - rows_before))
            return output

        watch.trainer.step = step

    @torch.no_grad()
    def _observe(self, watch: _Watch, output: Any, l0: torch.Tensor) -> None:
        loss = output.loss.detach().float()
        names, values = ["loss"], [loss]
        for name, value in output.losses.items():
            names.append(name)
            values.append(_scalar(value, loss.device))
        names.append("l0")
        values.append(l0.float().to(loss.device))
        vector, names_key = torch.stack(values), tuple(names)
        watch.record.add(names_key, vector)
        if self.live:
            watch.bar.add(names_key, vector)
        # SAETrainer moves n_training_steps on after step() returns; n_training_samples counts this batch
        watch.step, watch.rows = watch.trainer.n_training_steps + 1, watch.trainer.n_training_samples
        if watch.step % self.every == 0 or watch.rows >= self.total_rows:
            self._write(watch)

    def _write(self, watch: _Watch) -> None:
        n = watch.record.n
        means = watch.record.take(dead_fraction=_dead_fraction(watch.trainer, watch.step))
        if not means:
            return
        now = time.perf_counter()
        rate = (watch.rows - watch.last_rows) / max(now - watch.last_time, 1e-9)
        watch.last_rows, watch.last_time = watch.rows, now
        wall = self.wall_offset + now - self.started
        record = {
            "step": watch.step,
            "rows": watch.rows,
            "hook": watch.hook,
            "lr": watch.lr,
            **_fields(means),
            "rows_per_s": round(rate, 1),
            "wall_s": round(wall, 3),
            "steps_averaged": n,
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def postfix(self, limit: int = POSTFIX_CHARS) -> str:
        """The bar's text, means over the steps since the last call (no new step: the same text), e.g.
        ``loss=0.21 mse@16=0.4 @32=0.2 L0=31.5 dead=2.0%``; with several hooks one group per hook (``#0``).
        Levels shrink to ``mse@16..384=0.4..0.05``, then the text is cut, to keep within ``limit`` chars."""
        groups = []
        for watch in self.watches.values():
            means = watch.bar.take(
                dead_fraction=_dead_fraction(watch.trainer, watch.trainer.n_training_steps)
            )
            if means:
                groups.append(_fields(means))
        if not groups:  # no step since the last call: the same text
            return self.last_postfix
        for short in (False, True):
            texts = [_postfix_text(g, short) for g in groups]
            if len(texts) > 1:
                texts = [f"#{i} {t}" for i, t in enumerate(texts)]
            text = " | ".join(texts)
            if len(text) <= limit:
                break
        else:
            text = text[: limit - 1] + "…"
        self.last_postfix = text
        return text

    def close(self) -> None:
        """Write what was averaged since the last record (an interrupted run), close the file."""
        if self.file.closed:
            return
        for watch in self.watches.values():
            if watch.record.n:
                self._write(watch)
        self.file.close()

    # ------------------------------------------------------------------ end of run
    def write_plots(self, metrics: dict[str, dict[str, Any]] | None = None) -> list[Path]:
        """``training_curves.png`` from ``metrics.jsonl`` and, where ``metrics[hook]["per_k"]`` exists,
        ``fvu_vs_k.png``; returns the files written. The SAE is saved by then: a failure here is a warning."""
        try:
            return write_plots(self.output_path, read_metrics(self.path), metrics or {})
        except Exception as err:
            warnings.warn(f"could not write the training plots: {type(err).__name__}: {err}", stacklevel=2)
            return []


# ------------------------------------------------------------------------------------------------- per k


def matryoshka_levels(sae: Any) -> list[int]:
    """The ks a Matryoshka SAE (any cfg with ``k_levels``) is evaluated at: its levels and d_sae (ReLU);
    [] for other SAEs."""
    levels = getattr(sae.cfg, "k_levels", None)
    if not levels:
        return []
    return sorted({int(k) for k in levels} | {int(sae.cfg.d_sae)})


def per_k_metrics(
    sae: Any, evaluate: Callable[[dict[str, Any]], dict[str, Any]], ks: list[int] | None = None
) -> list[dict[str, Any]]:
    """``[{"k", "fvu", "fvu_per_sample", "cosine", "l0", "relu"}]`` at each of ``ks`` (default
    :func:`matryoshka_levels`); ``evaluate(encode_kwargs)`` returns ``evals.reconstruction.evaluate_sae``'s
    metrics on held-out rows."""
    d_sae = int(sae.cfg.d_sae)
    rows = []
    for k in matryoshka_levels(sae) if ks is None else ks:
        m = evaluate({"k": k})
        values = {key: m[key] for key in ("fvu", "fvu_per_sample", "cosine", "l0")}
        rows.append({"k": k, **values, "relu": k == d_sae})
    return rows


def per_k_table(per_k: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    """The summary's table: one line per k (the d_sae line is the ReLU encode)."""
    lines = [f"{indent}{'k':>12} | {'FVU':>7} | {'cosine':>7} | {'L0':>8}"]
    for row in per_k:
        label = f"{row['k']} (ReLU)" if row.get("relu") else str(row["k"])
        lines.append(f"{indent}{label:>12} | {row['fvu']:7.4f} | {row['cosine']:7.4f} | {row['l0']:8.1f}")
    return lines


# ----------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot: the caller's backend and figures are left alone)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(records: list[dict[str, Any]], key: str, level: str | None = None) -> tuple[list, list]:
    """(rows, values) of ``key`` (or of level ``level`` of ``key``), skipping records without a value."""
    xs, ys = [], []
    for r in records:
        value = r.get(key) if level is None else (r.get(key) or {}).get(level)
        if value is not None:
            xs.append(r["rows"])
            ys.append(value)
    return xs, ys


def _plot_curves(path: Path, by_hook: dict[str, list[dict[str, Any]]]) -> None:
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    kinds = {r.get("mse_kind", "mse").upper() for rs in by_hook.values() for r in rs}
    titles = {
        "loss": "loss",
        "mse": "/".join(sorted(kinds)),
        "l0": "L0 (active latents per row)",
        "dead_fraction": "dead fraction",
    }
    for ax, (key, title) in zip(axes, titles.items()):
        for hook, rs in by_hook.items():
            prefix = f"{hook} " if len(by_hook) > 1 else ""
            levels = sorted({k for r in rs for k in (r.get("mse_per_k") or {})}, key=int)
            if key != "mse":
                levels = []
            for level in levels:
                ax.plot(*_series(rs, "mse_per_k", level), label=f"{prefix}k={level}")
            if not levels:
                ax.plot(*_series(rs, key), label=prefix.strip() or None)
        values = [y for line in ax.get_lines() for y in line.get_ydata()]
        if key in ("loss", "mse") and values and min(values) > 0:
            ax.set_yscale("log")
        if key == "dead_fraction":
            ax.set_ylim(0, max(0.05, ax.get_ylim()[1]))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.get_lines()):
            ax.legend(fontsize="small")
    for ax in axes[2:]:
        ax.set_xlabel("training rows")
    fig.suptitle(f"training curves ({METRICS_FILENAME})")
    fig.savefig(path, dpi=100)


def _plot_fvu_vs_k(path: Path, per_k_by_hook: dict[str, list[dict[str, Any]]], source: str) -> None:
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for hook, per_k in per_k_by_hook.items():
        ax.plot([r["k"] for r in per_k], [r["fvu"] for r in per_k], marker="o", label=hook)
        for r in per_k:
            if r.get("relu"):
                ax.annotate("ReLU", (r["k"], r["fvu"]), textcoords="offset points", xytext=(4, 6))
    ax.set_xscale("log")
    ax.set_xlabel("k (active latents)")
    ax.set_ylabel("FVU")
    ax.set_title(f"FVU at each k ({source})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def write_plots(
    output_path: str | os.PathLike, records: list[dict[str, Any]], metrics: dict[str, dict[str, Any]]
) -> list[Path]:
    """Write ``training_curves.png`` (if there are records), ``fvu_vs_k.png`` (if a hook has ``per_k``)."""
    output_path = Path(output_path)
    written = []
    if records:
        by_hook: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_hook.setdefault(r.get("hook", ""), []).append(r)
        written.append(output_path / CURVES_FILENAME)
        _plot_curves(written[-1], by_hook)
    per_k_by_hook = {hook: m["per_k"] for hook, m in metrics.items() if m and m.get("per_k")}
    if per_k_by_hook:
        source = next(m.get("source") for m in metrics.values() if m) or "held-out rows"
        written.append(output_path / FVU_VS_K_FILENAME)
        _plot_fvu_vs_k(written[-1], per_k_by_hook, source)
    return written
