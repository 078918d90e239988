"""The dashboard's HTML page: the jinja2 template ``templates/dashboard.html.j2``, filled from a
``DashboardData``.

The page inlines every image as base64 PNG (each image once, as a CSS class; heatmaps as transparent overlays
that hide on hover) and needs no network. A small script counts the cards, offers a filter box, and records
``data-status="ok"`` (or the first script error) on ``<body>``.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageOps
from torch import Tensor

from sae_vision_ext.activations.images import to_rgb_image

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("sae_vision_ext.analysis", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def display_image(image: Any, size: tuple[int, int], thumb: int) -> Image.Image:
    """The image as the model sees it geometrically (centre crop to the model's aspect), ``thumb`` px tall."""
    image = to_rgb_image(image)
    height, width = size
    thumb_w = max(1, round(thumb * width / height))
    return ImageOps.fit(image, (thumb_w, thumb), method=Image.Resampling.BICUBIC)


def heatmap_overlay(heatmap: Tensor, scale: float, size: tuple[int, int]) -> Image.Image:
    """A transparent RGBA overlay of ``heatmap`` (``[gh, gw]``, divided by ``scale``): inferno colours with
    opacity ``0.3 + 0.6 sqrt(v)``, so inactive patches are dimmed and active ones glow."""
    values = (heatmap.clamp_min(0) / max(scale, 1e-12)).clamp(0, 1).numpy()
    rgba = colormaps["inferno"](values)
    rgba[..., 3] = 0.3 + 0.6 * np.sqrt(values)
    small = Image.fromarray((rgba * 255).astype(np.uint8), mode="RGBA")
    return small.resize(size, resample=Image.Resampling.BILINEAR)


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, in scientific notation when very large or small; ``–`` for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1000 or (0 < abs(value) < 10**-digits):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _card_context(card: Any, thumbs: dict[int, Image.Image]) -> dict[str, Any]:
    """What the template shows for one ``LatentCard``: statistics as text and the thumbnails with overlays."""
    scale = max((float(t.heatmap.max()) for t in card.top if t.heatmap is not None), default=0.0)
    pieces = []
    for top in card.top:
        width, height = thumbs[top.index].size
        overlay, grid = None, ""
        if top.heatmap is not None and scale > 0:
            overlay = _png_base64(heatmap_overlay(top.heatmap, scale, (width, height)))
            grid = "x".join(str(n) for n in top.heatmap.shape)
        pieces.append(
            {
                "index": top.index,
                "width": width,
                "height": height,
                "overlay": overlay,
                "grid": grid,
                "activation": format_number(top.activation),
                "label": format_number(top.activation, 2),
            }
        )
    has_score = card.name and not math.isnan(card.name_score)
    return {
        "latent": card.latent,
        "name": card.name,
        "score": format_number(card.name_score, 2) if has_score else "",
        "words": ", ".join(card.words[1:6]),
        "search": f"{card.latent} {card.name} {' '.join(card.words)}".lower(),
        "frequency": format_number(card.frequency, 4),
        "mean_activation": format_number(card.mean_activation),
        "max_activation": format_number(card.max_activation),
        "n_images": card.n_images,
        "thumbs": pieces,
    }


def _summary_items(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    nan = float("nan")
    return [
        ("model", summary.get("model")),
        ("hook", summary.get("hook_name")),
        ("tokens", summary.get("token_selection")),
        ("SAE", f"{summary.get('architecture')} {summary.get('d_in')}→{summary.get('d_sae')}"),
        ("images", summary.get("n_images")),
        ("FVU", format_number(summary.get("fvu", nan))),
        ("L0", format_number(summary.get("l0", nan), 1)),
        ("cosine", format_number(summary.get("cosine", nan))),
        ("dead", f"{100 * summary.get('dead_fraction', 0.0):.1f}%"),
        ("ranked by", summary.get("rank_by")),
    ]


def render_dashboard_html(
    data: Any,
    images: Sequence[Any],
    thumb: int = 112,
    fvu_plot_png: bytes | None = None,
    title: str = "",
) -> str:
    """The self-contained HTML page for ``data`` (a ``dashboard.DashboardData``; ``images``: the same sequence
    the data was collected on; ``thumb``: thumbnail height in px; ``fvu_plot_png``: a plot shown below)."""
    used = sorted({top.index for card in data.cards for top in card.top})
    thumbs = {i: display_image(images[i], data.image_size, thumb) for i in used}
    return _TEMPLATES.get_template("dashboard.html.j2").render(
        title=title or f"SAE latents — {data.summary.get('hook_name')}",
        images=[{"index": i, "png": _png_base64(thumbs[i])} for i in used],
        summary=_summary_items(data.summary),
        cards=[_card_context(card, thumbs) for card in data.cards],
        plot=base64.b64encode(fvu_plot_png).decode("ascii") if fvu_plot_png is not None else None,
    )
