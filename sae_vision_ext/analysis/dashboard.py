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
dictionary on patch tokens, a common approximation; pooled hooks (``hook_pooled``, ``hook_image_embed``) have
no patches, so their cards show the images without heatmaps.

The page is rendered by :mod:`~sae_vision_ext.analysis.dashboard_page` (a jinja2 template) and the plot by
:func:`~sae_vision_ext.evals.plots.plot_fvu_vs_l0`; :func:`write_dashboard` does all three.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_vision_ext.activations.source import stop_layer_for
from sae_vision_ext.analysis.dashboard_page import render_dashboard_html
from sae_vision_ext.evals.plots import plot_fvu_vs_l0
from sae_vision_ext.evals.reconstruction import ReconstructionAccumulator, evaluate_sae
from sae_vision_ext.vision.splice import sae_hook_name, sae_token_selection
from sae_vision_ext.vision.tokens import check_pooled_selection, layout_of, token_positions

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
    stop = stop_layer_for([hook_name], model)
    if stop is not None and stop >= model.n_layers:
        stop = None
    kwargs = {"stop_at_layer": stop} if stop is not None else {}
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], **kwargs)
    return cache[hook_name]


def _image_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over images (img/s) on stderr."""
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
        raise ValueError(
            f"an SAE is spliced at {hook_name!r}; call model.reset_saes() before building a dashboard"
        )
    selection = sae_token_selection(sae)
    layout = layout_of(model, hook_name)
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
            d_in = rows.shape[-1]
            accumulator.update(rows.reshape(-1, d_in), x_hat.reshape(-1, d_in), z.reshape(-1, d_sae))
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
    layout = layout_of(model, hook_name)
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


# ------------------------------------------------------------------------------------------------ FVU vs L0


def fvu_l0_points(
    sae: Any,
    rows: Tensor,
    label: str = "",
    ks: Sequence[int] | None = None,
    batch_size: int = 4096,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """FVU and L0 of ``sae`` on activation rows ``[N, d_in]``; with ``ks``, one point per inference-time k
    (``sae.encode(x, k=k)``, for SAEs that choose k at inference such as the Matryoshka SAE)."""
    batches = [rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size)]
    if not ks:
        result = evaluate_sae(sae, batches, progress=progress)
        return [{"label": label, "group": label, "l0": result["l0"], "fvu": result["fvu"]}]
    points = []
    for k in ks:
        result = evaluate_sae(sae, batches, encode_kwargs={"k": int(k)}, progress=progress)
        points.append({"label": f"k={k}", "group": label, "l0": result["l0"], "fvu": result["fvu"]})
    return points


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
            positions = token_positions(layout_of(model, hook_name), selection, acts.shape[1])
            rows = acts if positions is None else acts[:, positions]
            chunks.append(rows.reshape(-1, rows.shape[-1]))
    return torch.cat(chunks).float()


# ------------------------------------------------------------------------------------------------- one call


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
        model,
        sae,
        images,
        preprocess=preprocess,
        n_latents=n_latents,
        top_k=top_k,
        latents=latents,
        rank_by=rank_by,
        batch_size=batch_size,
        names=names,
        progress=progress,
    )
    rows = collect_rows(model, sae, images, preprocess, batch_size=batch_size, progress=progress)
    label = f"{data.summary['architecture']} d_sae={data.summary['d_sae']}"
    points = fvu_l0_points(sae, rows, label=label, ks=ks, progress=progress)
    for extra_label, extra in extra_saes:
        same_rows = sae_token_selection(extra) == sae_token_selection(sae)
        if sae_hook_name(extra) != sae_hook_name(sae) or not same_rows:
            raise ValueError(f"SAE {extra_label!r} is not at the same hook/tokens as the main SAE")
        points += fvu_l0_points(extra, rows, label=extra_label, progress=progress)
    plot_path = out_dir / "fvu_vs_l0.png"
    png = plot_fvu_vs_l0(points, plot_path, title=f"FVU against L0 at {data.summary['hook_name']}")
    html_text = render_dashboard_html(data, images, thumb=thumb, fvu_plot_png=png, title=title)
    html_path = out_dir / "dashboard.html"
    html_path.write_text(html_text, encoding="utf-8")
    summary = {"summary": data.summary, "points": points, "latents": [c.latent for c in data.cards]}
    (out_dir / "dashboard_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return {"html": html_path, "plot": plot_path, "summary": out_dir / "dashboard_summary.json"}
