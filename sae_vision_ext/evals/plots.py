"""The package's plots (matplotlib, Agg backend, no display): FVU against L0, and stability across runs.

``plot_fvu_vs_l0`` serves both the comparison report (one line per SAE family, log-log) and the dashboard (one
line per SAE, one point per inference k of a Matryoshka SAE).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

FVU_LABEL = "FVU (fraction of variance unexplained)"


def _png(figure: Figure, path: str | Path | None, dpi: int) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


def plot_fvu_vs_l0(
    points: Sequence[dict[str, Any]],
    path: str | Path | None = None,
    title: str = "",
    log_fvu: bool = False,
    fvu_label: str = FVU_LABEL,
) -> bytes:
    """FVU (y) against L0 (x) of ``points`` (dicts with ``l0``, ``fvu``, optional ``group`` and ``label``).

    One line per ``group`` (single markers for a group of one point); a point whose ``label`` differs from its
    group is annotated with it (e.g. ``k=32``). L0 is on a log scale when it spans more than 10x; ``log_fvu``
    puts FVU on a log scale too (values clamped at 1e-6). Writes ``path`` when given; returns the PNG bytes.
    """
    figure = Figure(figsize=(6, 4), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(str(point.get("group", "")), []).append(point)
    for group, members in groups.items():
        members = sorted(members, key=lambda p: p["l0"])
        xs = [p["l0"] for p in members]
        ys = [max(p["fvu"], 1e-6) if log_fvu else p["fvu"] for p in members]
        axes.plot(xs, ys, marker="o", linestyle="-" if len(members) > 1 else "", label=group or None)
        for point, y in zip(members, ys):
            if point.get("label") and point.get("label") != group:
                label, position = str(point["label"]), (point["l0"], y)
                axes.annotate(label, position, textcoords="offset points", xytext=(4, 4), fontsize=8)
    l0s = [p["l0"] for p in points if p["l0"] > 0]
    if l0s and max(l0s) / min(l0s) > 10:
        axes.set_xscale("log")
    if log_fvu:
        axes.set_yscale("log")
    axes.set_xlabel("L0 (mean active latents per row)")
    axes.set_ylabel(fvu_label)
    axes.set_title(title or "Reconstruction against sparsity")
    axes.grid(True, which="both", alpha=0.3)
    if any(groups):
        axes.legend(fontsize=8)
    return _png(figure, path, dpi=110)


def plot_stability(rows: Sequence[dict[str, Any]], path: str | Path | None = None) -> bytes:
    """Horizontal bars of ``row["stability"]`` (0 to 1), one per ``row["protocol"]``."""
    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot(1, 1, 1)
    axes.barh(range(len(rows)), [r["stability"] for r in rows], color="tab:blue")
    axes.set_yticks(range(len(rows)), [r["protocol"] for r in rows], fontsize=8)
    axes.set_xlim(0, 1)
    axes.set_xlabel("stability (mean matched |cos| between runs)")
    axes.invert_yaxis()
    return _png(figure, path, dpi=120)
