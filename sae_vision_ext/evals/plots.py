"""The package's plots (matplotlib, Agg backend, no display): FVU against L0, and stability across runs.

``plot_fvu_vs_l0`` serves both the comparison report (one line per SAE family at the measured L0, log-log,
error bars and bands over seeds) and the dashboard (one line per SAE, one point per inference k of a
Matryoshka SAE).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

FVU_LABEL = "FVU (fraction of variance unexplained)"
# annotation offsets (points) of successive groups
_OFFSETS = ((4, 4), (4, -10), (-12, 12), (-12, -18), (6, 16), (6, -22), (-30, 4), (-30, -10))


def _png(figure: Figure, path: str | Path | None, dpi: int) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


def point_annotation(point: dict[str, Any], group: str = "", annotate_l0: bool = True) -> str:
    """The text next to a point of :func:`plot_fvu_vs_l0`: its ``label`` when that differs from its group
    (e.g. the nominal ``k=32``), then with ``annotate_l0`` the L0 it sits at (``L0 27.4``)."""
    label = str(point.get("label") or "")
    parts = [label] if label and label != group else []
    if annotate_l0:
        parts.append(f"L0 {point['l0']:.3g}")
    return ", ".join(parts)


def plot_fvu_vs_l0(
    points: Sequence[dict[str, Any]],
    path: str | Path | None = None,
    title: str = "",
    log_fvu: bool = False,
    fvu_label: str = FVU_LABEL,
    annotate_l0: bool = True,
) -> bytes:
    """FVU (y) against L0 (x) of ``points`` (dicts with ``l0``, ``fvu``, optional ``group`` and ``label``).

    Every point sits at the L0 it carries, which should be the MEASURED mean number of non-zero latents per
    row (not a nominal k: an SAE may reach fewer). One line per ``group`` (single markers for a group of one
    point); each point is annotated by :func:`point_annotation` (its label when it differs from the group,
    e.g. ``k=32``, and with ``annotate_l0`` its L0). Spread across runs (seeds), all optional: ``l0_std``
    and ``fvu_std`` draw error bars; ``fvu_min`` and ``fvu_max`` a shaded band along a group's line. L0 is on
    a log scale when it spans more than 10x; ``log_fvu`` puts FVU on a log scale too (values and bars clamped
    at 1e-6). Writes ``path`` when given; returns the PNG bytes.
    """
    floor = 1e-6 if log_fvu else -math.inf
    many = len(points) > 12
    figure = Figure(figsize=(9, 6) if many else (6, 4), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(str(point.get("group", "")), []).append(point)
    for index, (group, members) in enumerate(groups.items()):
        members = sorted(members, key=lambda p: p["l0"])
        xs = [p["l0"] for p in members]
        ys = [max(p["fvu"], floor) for p in members]
        xerr = [p.get("l0_std") or 0.0 for p in members]
        yerr_high = [p.get("fvu_std") or 0.0 for p in members]
        yerr_low = [y - max(y - e, floor) for y, e in zip(ys, yerr_high)]
        bars = axes.errorbar(
            xs,
            ys,
            xerr=xerr if any(xerr) else None,
            yerr=[yerr_low, yerr_high] if any(yerr_high) else None,
            marker="o" if len(members) > 1 else "s",  # a line of points, or a single run
            markersize=4,
            capsize=2,
            linestyle="-" if len(members) > 1 else "",
            label=group or None,
        )
        if len(members) > 1 and all("fvu_min" in p and "fvu_max" in p for p in members):
            lows = [max(p["fvu_min"], floor) for p in members]
            highs = [max(p["fvu_max"], floor) for p in members]
            axes.fill_between(xs, lows, highs, color=bars.lines[0].get_color(), alpha=0.15, linewidth=0)
        for point, y in zip(members, ys):
            text = point_annotation(point, group, annotate_l0)
            if text:
                axes.annotate(
                    text,
                    (point["l0"], y),
                    textcoords="offset points",
                    xytext=_OFFSETS[index % len(_OFFSETS)],  # groups at the same L0 stay legible
                    fontsize=6 if many else 8,
                )
    l0s = [p["l0"] for p in points if p["l0"] > 0]
    if l0s and max(l0s) / min(l0s) > 10:
        axes.set_xscale("log")
    if log_fvu:
        axes.set_yscale("log")
    axes.set_xlabel("L0 measured (mean non-zero latents per row)")
    axes.set_ylabel(fvu_label)
    axes.set_title(title or "Reconstruction against sparsity")
    axes.grid(True, which="both", alpha=0.3)
    if any(groups):
        axes.legend(fontsize=7 if many else 8)
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
