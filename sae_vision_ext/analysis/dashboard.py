"""Latent dashboards: a self-contained HTML page of the top latents, and a PNG of FVU against L0.

One pass over the images collects, for every latent ``i`` of the SAE at its hook, over the token rows the SAE
was trained on (``cfg.metadata.token_selection``):

- firing frequency ``f_i = #{rows: z_i > 0} / #rows``; mean activation when firing; maximum activation;
- each image's activation ``a_i(image) = max over its rows of z_i``, keeping the ``top_k`` images per latent;
- the SAE's reconstruction metrics on those rows (FVU, L0, dead fraction; ``evals.reconstruction``).

Latents are ranked by total activation mass ``sum over images of a_i`` (``rank_by="total"``), by ``frequency``
or by ``max``; or chosen explicitly. A second pass over the top images only computes patch heatmaps: the SAE
applied to the patch tokens of the same hook, ``z_i`` reshaped on the token layout's grid and overlaid on the
image (normalised per latent by its largest patch value). For an SAE trained on CLS tokens this reads the CLS
dictionary on patch tokens, a common approximation; pooled hooks (``hook_pooled``, ``hook_image_embed``) have no
patches, so their cards show the images without heatmaps.

The page inlines every image as base64 PNG (each image once, as a CSS class; heatmaps as transparent overlays
that hide on hover) and needs no network. A small script counts the cards, offers a filter box, and records
``data-status="ok"`` (or the first script error) on ``<body>``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_vision_ext.analysis.splice import sae_hook_name, sae_token_selection
from sae_vision_ext.analysis.tokens import check_pooled_selection, token_positions

RANKINGS = ("total", "frequency", "max")


@dataclass
class TopImage:
    index: int
    activation: float
    heatmap: Tensor | None = None  # [gh, gw] patch activations of this latent


@dataclass
class LatentCard:
    latent: int
    frequency: float
    mean_activation: float
    max_activation: float
    n_images: int
    top: list[TopImage] = field(default_factory=list)
    name: str = ""
    name_score: float = float("nan")
    words: list[str] = field(default_factory=list)


@dataclass
class DashboardData:
    cards: list[LatentCard]
    summary: dict[str, Any]
    image_size: tuple[int, int]


def _as_batch(images: Sequence[Any], preprocess: Callable[[Any], Tensor]) -> Tensor:
    return torch.stack([preprocess(image) for image in images])


def _hook_activations(model: Any, hook_name: str, batch: Tensor) -> Tensor:
    """The activation at ``hook_name`` for a preprocessed batch, running no further than needed."""
    stop = None
    if hook_name.startswith("blocks."):
        stop = int(hook_name.split(".")[1]) + 1
        if stop >= model.n_layers:
            stop = None
    elif hook_name == "hook_embed":
        stop = 0
    kwargs = {"stop_at_layer": stop} if stop is not None else {}
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], **kwargs)
    return cache[hook_name]


def _image_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over images (img/s) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, leave=None, dynamic_ncols=True)


def _device_dtype(sae: Any) -> tuple[torch.device, torch.dtype]:
    param = next(iter(sae.parameters()))
    return param.device, param.dtype


def _encode(sae: Any, acts: Tensor) -> Tensor:
    device, dtype = _device_dtype(sae)
    z = sae.encode(acts.to(device=device, dtype=dtype))
    return (z.to_dense() if z.is_sparse else z).float()


def collect_dashboard_data(
    model: Any,
    sae: Any,
    images: Sequence[Any],
    preprocess: Callable[[Any], Tensor] | None = None,
    n_latents: int = 16,
    top_k: int = 8,
    latents: Sequence[int] | None = None,
    rank_by: str = "total",
    batch_size: int = 32,
    names: Any = None,
    heatmaps: bool = True,
    progress: bool = True,
) -> DashboardData:
    """Statistics, top images and heatmaps of the SAE's latents on ``images`` (PIL images, or anything
    ``preprocess`` accepts; ``preprocess`` defaults to ``model.preprocess``). ``progress``: tqdm bars
    (img/s) on stderr for the pass over the images and the heatmap pass."""
    from sae_vision_ext.evals.reconstruction import ReconstructionAccumulator

    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}")
    if len(images) == 0:
        raise ValueError("no images to build a dashboard from")
    preprocess = preprocess or getattr(model, "preprocess", None)
    if preprocess is None:
        raise ValueError("pass preprocess= (the transform returned by load_vision_model)")
    hook_name = sae_hook_name(sae)
    wrapper_of = getattr(model, "sae_wrapper", None)
    if wrapper_of is not None and wrapper_of(hook_name) is not None:
        raise ValueError(f"an SAE is spliced at {hook_name!r}; call model.reset_saes() before building a dashboard")
    selection = sae_token_selection(sae)
    layout = getattr(model, "token_layout", None)
    d_sae = int(sae.cfg.d_sae)
    top_k = max(1, min(top_k, len(images)))

    fire_counts = torch.zeros(d_sae, dtype=torch.float64)
    act_sums = torch.zeros(d_sae, dtype=torch.float64)
    max_acts = torch.zeros(d_sae)
    image_counts = torch.zeros(d_sae, dtype=torch.long)
    image_mass = torch.zeros(d_sae, dtype=torch.float64)
    top_values = torch.full((d_sae, 0), -1.0)
    top_index = torch.zeros((d_sae, 0), dtype=torch.long)
    accumulator = ReconstructionAccumulator()
    is_pooled = None
    bar = _image_bar(len(images), "dashboard: latent statistics", progress)
    with torch.no_grad(), bar:
        for start in range(0, len(images), batch_size):
            batch = _as_batch(images[start : start + batch_size], preprocess)
            bar.update(batch.shape[0])
            acts = _hook_activations(model, hook_name, batch.to(getattr(model, "device", "cpu")))
            is_pooled = acts.dim() == 2
            if is_pooled:
                check_pooled_selection(selection, hook_name)
                rows = acts.unsqueeze(1)
            else:
                positions = token_positions(layout, selection, acts.shape[1])
                rows = acts if positions is None else acts[:, positions.to(acts.device)]
            z = _encode(sae, rows)  # [B, n, d_sae]
            x_hat = sae.decode(z.to(_device_dtype(sae)[1]))
            accumulator.update(rows.reshape(-1, rows.shape[-1]), x_hat.reshape(-1, rows.shape[-1]), z.reshape(-1, d_sae))
            z = z.cpu()
            firing = z > 0
            fire_counts += firing.sum(dim=(0, 1)).double()
            act_sums += z.sum(dim=(0, 1)).double()
            per_image = z.amax(dim=1)  # [B, d_sae]
            max_acts = torch.maximum(max_acts, per_image.amax(dim=0))
            image_counts += (per_image > 0).sum(dim=0)
            image_mass += per_image.sum(dim=0).double()
            batch_index = torch.arange(start, start + per_image.shape[0]).expand(d_sae, -1)
            top_values = torch.cat([top_values, per_image.T], dim=1)
            top_index = torch.cat([top_index, batch_index], dim=1)
            keep = min(top_k, top_values.shape[1])
            top_values, order = top_values.topk(keep, dim=1)
            top_index = top_index.gather(1, order)
    metrics = accumulator.result()
    n_rows = metrics["n_rows"]
    frequency = fire_counts / n_rows
    mean_when_firing = act_sums / fire_counts.clamp_min(1)

    if latents is None:
        score = {"total": image_mass, "frequency": frequency, "max": max_acts.double()}[rank_by]
        alive = (fire_counts > 0).nonzero().squeeze(1)
        order = alive[score[alive].argsort(descending=True)]
        chosen = order[:n_latents].tolist()
    else:
        chosen = [int(i) for i in latents]
        bad = [i for i in chosen if not 0 <= i < d_sae]
        if bad:
            raise IndexError(f"latents {bad} out of range for d_sae={d_sae}")

    cards = []
    for latent in chosen:
        tops = [
            TopImage(index=int(i), activation=float(v))
            for v, i in zip(top_values[latent].tolist(), top_index[latent].tolist())
            if v > 0
        ]
        card = LatentCard(
            latent=latent,
            frequency=float(frequency[latent]),
            mean_activation=float(mean_when_firing[latent]),
            max_activation=float(max_acts[latent]),
            n_images=int(image_counts[latent]),
            top=tops,
        )
        if names is not None and latent in names:
            concept = names[latent]
            card.name, card.name_score, card.words = concept.name, concept.score, list(concept.words)
        elif isinstance(names, dict) and latent in names:
            card.name = str(names[latent])
        cards.append(card)

    if heatmaps and not is_pooled and layout is not None and layout.n_patches > 0:
        _fill_heatmaps(model, sae, images, preprocess, hook_name, cards, batch_size, progress=progress)

    image_size = tuple(getattr(getattr(model, "cfg", None), "image_size", (224, 224)))
    summary = {
        "model": getattr(model, "spec", type(model).__name__),
        "hook_name": hook_name,
        "token_selection": selection or "all",
        "architecture": sae.cfg.architecture() if hasattr(sae.cfg, "architecture") else type(sae).__name__,
        "d_in": int(sae.cfg.d_in),
        "d_sae": d_sae,
        "n_images": len(images),
        "n_rows": n_rows,
        "fvu": metrics["fvu"],
        "l0": metrics["l0"],
        "cosine": metrics["cosine"],
        "dead_fraction": float((fire_counts == 0).double().mean()),
        "rank_by": rank_by if latents is None else "explicit",
    }
    return DashboardData(cards=cards, summary=summary, image_size=image_size)  # type: ignore[arg-type]


def _fill_heatmaps(
    model: Any,
    sae: Any,
    images: Sequence[Any],
    preprocess: Callable[[Any], Tensor],
    hook_name: str,
    cards: list[LatentCard],
    batch_size: int,
    progress: bool = True,
) -> None:
    layout = model.token_layout
    needed = sorted({top.index for card in cards for top in card.top})
    latent_index = torch.tensor([card.latent for card in cards], dtype=torch.long)
    maps: dict[int, Tensor] = {}
    bar = _image_bar(len(needed), "dashboard: heatmaps", progress)
    with torch.no_grad(), bar:
        for start in range(0, len(needed), batch_size):
            chunk = needed[start : start + batch_size]
            batch = _as_batch([images[i] for i in chunk], preprocess)
            bar.update(len(chunk))
            acts = _hook_activations(model, hook_name, batch.to(getattr(model, "device", "cpu")))
            patches = layout.select(acts, "patches")
            z = _encode(sae, patches)[..., latent_index].cpu()  # [B, n_patches, n_cards]
            grid = z.reshape(z.shape[0], *layout.grid_size, z.shape[-1])
            for row, image_index in enumerate(chunk):
                maps[image_index] = grid[row]
    for column, card in enumerate(cards):
        for top in card.top:
            top.heatmap = maps[top.index][..., column].clone()


# ----------------------------------------------------------------------------------------------- rendering


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def display_image(image: Any, size: tuple[int, int], thumb: int) -> Any:
    """The image as the model sees it geometrically (centre crop to the model's aspect), ``thumb`` px tall."""
    from PIL import Image, ImageOps

    from sae_vision_ext.activations.images import to_rgb_image

    image = to_rgb_image(image)
    height, width = size
    thumb_w = max(1, round(thumb * width / height))
    return ImageOps.fit(image, (thumb_w, thumb), method=Image.Resampling.BICUBIC)


def heatmap_overlay(heatmap: Tensor, scale: float, size: tuple[int, int]) -> Any:
    """A transparent RGBA overlay of ``heatmap`` (``[gh, gw]``, divided by ``scale``): inferno colours with
    opacity ``0.3 + 0.6 sqrt(v)``, so inactive patches are dimmed and active ones glow."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    values = (heatmap.clamp_min(0) / max(scale, 1e-12)).clamp(0, 1).numpy()
    rgba = colormaps["inferno"](values)
    rgba[..., 3] = 0.3 + 0.6 * np.sqrt(values)
    small = Image.fromarray((rgba * 255).astype(np.uint8), mode="RGBA")
    return small.resize(size, resample=Image.Resampling.BILINEAR)


_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; background: #f6f7f9; color: #1d2330; }
h1 { font-size: 22px; margin: 0 0 4px; }
.summary { display: flex; flex-wrap: wrap; gap: 8px 18px; margin: 8px 0 16px; font-size: 14px; }
.summary b { font-weight: 600; }
.toolbar { margin: 0 0 16px; display: flex; gap: 12px; align-items: center; }
.toolbar input { padding: 6px 10px; font-size: 14px; border: 1px solid #c5cad3; border-radius: 6px; width: 260px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 16px; }
.latent-card { background: #fff; border: 1px solid #dde1e7; border-radius: 10px; padding: 12px 14px; }
.latent-card h2 { font-size: 16px; margin: 0 0 6px; }
.latent-card h2 .name { color: #8a3ffc; }
.words { font-size: 12px; color: #5b6270; margin-bottom: 6px; }
.stats { font-size: 12px; color: #39404d; margin-bottom: 8px; display: flex; flex-wrap: wrap; gap: 4px 14px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
.thumb { position: relative; background-size: cover; border-radius: 4px; overflow: hidden; }
.thumb img { position: absolute; inset: 0; width: 100%; height: 100%; transition: opacity .15s; }
.thumb:hover img { opacity: 0; }
.thumb .act { position: absolute; left: 0; bottom: 0; font-size: 10px; background: rgba(0,0,0,.6); color: #fff;
  padding: 1px 4px; border-top-right-radius: 4px; }
.plot img { max-width: 520px; width: 100%; background: #fff; border: 1px solid #dde1e7; border-radius: 8px; }
.empty { font-size: 12px; color: #8a909c; }
footer { margin-top: 20px; font-size: 12px; color: #6b7280; }
"""

_HEAD_SCRIPT = """
window.dashboardErrors = [];
(function () {
  function record(message) {
    window.dashboardErrors.push(String(message));
    if (document.body) { document.body.setAttribute('data-status', 'error: ' + window.dashboardErrors[0]); }
  }
  window.addEventListener('error', function (event) { record(event.message || 'resource or script error'); }, true);
  var originalError = console.error;
  console.error = function () { record(Array.prototype.join.call(arguments, ' ')); originalError.apply(console, arguments); };
})();
"""

_BODY_SCRIPT = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('.latent-card'));
  var filter = document.getElementById('filter');
  function apply() {
    var q = (filter.value || '').toLowerCase().trim();
    var shown = 0;
    cards.forEach(function (card) {
      var hit = !q || card.getAttribute('data-search').indexOf(q) !== -1;
      card.style.display = hit ? '' : 'none';
      if (hit) { shown += 1; }
    });
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' latents';
  }
  filter.addEventListener('input', apply);
  apply();
  document.body.setAttribute('data-cards', String(cards.length));
  var errors = window.dashboardErrors || [];
  document.body.setAttribute('data-status', errors.length ? 'error: ' + errors[0] : 'ok');
})();
"""


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1000 or (0 < abs(value) < 10 ** -digits):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def render_dashboard_html(
    data: DashboardData, images: Sequence[Any], thumb: int = 112, fvu_plot_png: bytes | None = None, title: str = ""
) -> str:
    """The self-contained HTML page for ``data`` (``images``: the same sequence the data was collected on)."""
    size = data.image_size
    used = sorted({top.index for card in data.cards for top in card.top})
    thumbs = {i: display_image(images[i], size, thumb) for i in used}
    css_images = "\n".join(f".im-{i} {{ background-image: url(data:image/png;base64,{_png_base64(thumbs[i])}); }}" for i in used)
    card_html = []
    for card in data.cards:
        scale = max((float(t.heatmap.max()) for t in card.top if t.heatmap is not None), default=0.0)
        pieces = []
        for top in card.top:
            w, h = thumbs[top.index].size
            overlay = ""
            if top.heatmap is not None and scale > 0:
                overlay_png = _png_base64(heatmap_overlay(top.heatmap, scale, (w, h)))
                overlay = f'<img alt="patch heatmap" src="data:image/png;base64,{overlay_png}">'
            pieces.append(
                f'<div class="thumb im-{top.index}" style="width:{w}px;height:{h}px" '
                f'title="image {top.index}: activation {_fmt(top.activation)}">{overlay}'
                f'<span class="act">{_fmt(top.activation, 2)}</span></div>'
            )
        name = html.escape(card.name)
        words = ", ".join(html.escape(w) for w in card.words[1:6])
        search = html.escape(f"{card.latent} {card.name} {' '.join(card.words)}".lower(), quote=True)
        name_html = f' <span class="name">{name}</span>' if name else ""
        score_html = f" (cos {_fmt(card.name_score, 2)})" if name and not math.isnan(card.name_score) else ""
        card_html.append(
            f'<section class="latent-card" data-latent="{card.latent}" data-search="{search}">'
            f"<h2>latent {card.latent}{name_html}{score_html}</h2>"
            + (f'<div class="words">also: {words}</div>' if words else "")
            + '<div class="stats">'
            f"<span>firing frequency <b>{_fmt(card.frequency, 4)}</b></span>"
            f"<span>mean activation <b>{_fmt(card.mean_activation)}</b></span>"
            f"<span>max <b>{_fmt(card.max_activation)}</b></span>"
            f"<span>images <b>{card.n_images}</b></span></div>"
            + (f'<div class="thumbs">{"".join(pieces)}</div>' if pieces else '<div class="empty">never fired</div>')
            + "</section>"
        )
    s = data.summary
    summary_items = [
        ("model", s.get("model")),
        ("hook", s.get("hook_name")),
        ("tokens", s.get("token_selection")),
        ("SAE", f"{s.get('architecture')} {s.get('d_in')}→{s.get('d_sae')}"),
        ("images", s.get("n_images")),
        ("FVU", _fmt(s.get("fvu", float("nan")))),
        ("L0", _fmt(s.get("l0", float("nan")), 1)),
        ("cosine", _fmt(s.get("cosine", float("nan")))),
        ("dead", f"{100 * s.get('dead_fraction', 0.0):.1f}%"),
        ("ranked by", s.get("rank_by")),
    ]
    summary_html = "".join(f"<span>{html.escape(str(k))} <b>{html.escape(str(v))}</b></span>" for k, v in summary_items)
    plot_html = ""
    if fvu_plot_png is not None:
        encoded = base64.b64encode(fvu_plot_png).decode("ascii")
        plot_html = f'<h2>FVU against L0</h2><div class="plot"><img alt="FVU against L0" src="data:image/png;base64,{encoded}"></div>'
    title = title or f"SAE latents — {s.get('hook_name')}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{_CSS}\n{css_images}</style>"
        f"<script>{_HEAD_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><div class=\"summary\">{summary_html}</div>"
        '<div class="toolbar"><input id="filter" type="search" placeholder="filter by latent id or name">'
        '<span id="shown"></span></div>'
        f'<div class="grid">{"".join(card_html)}</div>{plot_html}'
        "<footer>Patch heatmaps: inactive patches dimmed, active ones bright (scaled to the latent's largest patch value among the images shown); hover an image to see it plain. Generated by sae-vision-ext.</footer>"
        f"<script>{_BODY_SCRIPT}</script></body></html>\n"
    )


# ----------------------------------------------------------------------------------------------- FVU vs L0


def fvu_l0_points(
    sae: Any, rows: Tensor, label: str = "", ks: Sequence[int] | None = None, batch_size: int = 4096,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """FVU and L0 of ``sae`` on activation rows ``[N, d_in]``; with ``ks``, one point per inference-time k
    (``sae.encode(x, k=k)``, for SAEs that choose k at inference such as the Matryoshka SAE)."""
    from sae_vision_ext.evals.reconstruction import evaluate_sae

    batches = [rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size)]
    if not ks:
        result = evaluate_sae(sae, batches, progress=progress)
        return [{"label": label, "group": label, "l0": result["l0"], "fvu": result["fvu"]}]
    points = []
    for k in ks:
        result = evaluate_sae(sae, batches, encode_kwargs={"k": int(k)}, progress=progress)
        points.append({"label": f"k={k}", "group": label, "l0": result["l0"], "fvu": result["fvu"]})
    return points


def plot_fvu_vs_l0(points: Sequence[dict[str, Any]], path: str | Path | None = None, title: str = "") -> bytes:
    """Scatter/line plot of FVU (y) against L0 (x, log scale when it spans more than 10x); one line per
    ``group``. Writes ``path`` when given; returns the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(str(point.get("group", "")), []).append(point)
    for group, members in groups.items():
        members = sorted(members, key=lambda p: p["l0"])
        xs = [p["l0"] for p in members]
        ys = [p["fvu"] for p in members]
        axes.plot(xs, ys, marker="o", linestyle="-" if len(members) > 1 else "", label=group or None)
        for point in members:
            if point.get("label") and point.get("label") != group:
                axes.annotate(str(point["label"]), (point["l0"], point["fvu"]), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)
    l0s = [p["l0"] for p in points if p["l0"] > 0]
    if l0s and max(l0s) / min(l0s) > 10:
        axes.set_xscale("log")
    axes.set_xlabel("L0 (mean active latents per row)")
    axes.set_ylabel("FVU (fraction of variance unexplained)")
    axes.set_title(title or "Reconstruction against sparsity")
    axes.grid(True, alpha=0.3)
    if any(g for g in groups):
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    png = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


def collect_rows(
    model: Any,
    sae: Any,
    images: Sequence[Any],
    preprocess: Callable[[Any], Tensor],
    batch_size: int = 32,
    progress: bool = True,
) -> Tensor:
    """The SAE's input rows (its hook, its token selection) for ``images``, as ``[N_rows, d_in]``."""
    hook_name = sae_hook_name(sae)
    selection = sae_token_selection(sae)
    chunks = []
    with _image_bar(len(images), "dashboard: SAE input rows", progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = _as_batch(images[start : start + batch_size], preprocess)
            acts = _hook_activations(model, hook_name, batch)
            bar.update(batch.shape[0])
            if acts.dim() == 2:
                chunks.append(acts)
                continue
            positions = token_positions(model.token_layout, selection, acts.shape[1])
            rows = acts if positions is None else acts[:, positions]
            chunks.append(rows.reshape(-1, rows.shape[-1]))
    return torch.cat(chunks).float()


# ----------------------------------------------------------------------------------------------- one call


def write_dashboard(
    model: Any,
    sae: Any,
    images: Sequence[Any],
    out_dir: str | Path,
    preprocess: Callable[[Any], Tensor] | None = None,
    n_latents: int = 16,
    top_k: int = 8,
    latents: Sequence[int] | None = None,
    rank_by: str = "total",
    names: Any = None,
    batch_size: int = 32,
    extra_saes: Sequence[tuple[str, Any]] = (),
    ks: Sequence[int] | None = None,
    thumb: int = 112,
    title: str = "",
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``dashboard.html`` and ``fvu_vs_l0.png`` into ``out_dir``; returns their paths.

    The plot has one point for ``sae`` (or one per ``k`` in ``ks``) and one per ``(label, sae)`` in
    ``extra_saes`` (SAEs at the same hook, e.g. other sizes), all measured on the same images. ``progress``:
    tqdm bars on stderr for each pass over the images (img/s) and each evaluation (rows/s).
    """
    preprocess = preprocess or getattr(model, "preprocess", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect_dashboard_data(
        model, sae, images, preprocess=preprocess, n_latents=n_latents, top_k=top_k, latents=latents,
        rank_by=rank_by, batch_size=batch_size, names=names, progress=progress,
    )
    rows = collect_rows(model, sae, images, preprocess, batch_size=batch_size, progress=progress)
    label = f"{data.summary['architecture']} d_sae={data.summary['d_sae']}"
    points = fvu_l0_points(sae, rows, label=label, ks=ks, progress=progress)
    for extra_label, extra in extra_saes:
        if sae_hook_name(extra) != sae_hook_name(sae) or sae_token_selection(extra) != sae_token_selection(sae):
            raise ValueError(f"SAE {extra_label!r} is not at the same hook/tokens as the main SAE")
        points += fvu_l0_points(extra, rows, label=extra_label, progress=progress)
    plot_path = out_dir / "fvu_vs_l0.png"
    png = plot_fvu_vs_l0(points, plot_path, title=f"FVU against L0 at {data.summary['hook_name']}")
    html_text = render_dashboard_html(data, images, thumb=thumb, fvu_plot_png=png, title=title)
    html_path = out_dir / "dashboard.html"
    html_path.write_text(html_text, encoding="utf-8")
    (out_dir / "dashboard_summary.json").write_text(
        json.dumps({"summary": data.summary, "points": points, "latents": [c.latent for c in data.cards]}, indent=2),
        encoding="utf-8",
    )
    return {"html": html_path, "plot": plot_path, "summary": out_dir / "dashboard_summary.json"}
