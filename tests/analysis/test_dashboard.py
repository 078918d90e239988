"""Dashboards: statistics, heatmaps on the right patches, FVU-L0 plot, CLI, and the page in headless
Chromium."""

import json

import pytest
import torch
from PIL import Image

from sae_vision_ext.analysis.browser import ChromiumNotFound, find_chromium, open_page
from sae_vision_ext.analysis.dashboard import (
    collect_dashboard_data,
    fvu_l0_points,
    plot_fvu_vs_l0,
    write_dashboard,
)
from sae_vision_ext.analysis.toy import (
    make_sae,
    orthonormal_directions,
    planted_sae,
    synthetic_images,
    tiny_clip,
)

PATCH = 8  # tiny CLIP: 32x32 images, 8x8 patches, a 4x4 grid


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


def _square_image(row, col):
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 255, 255), (col * PATCH, row * PATCH, (col + 1) * PATCH, (row + 1) * PATCH))
    return image


def _embed_acts(model, preprocess, images):
    _, cache = model.run_with_cache(torch.stack([preprocess(i) for i in images]), names_filter=["hook_embed"])
    return cache["hook_embed"]


def test_heatmaps_light_up_the_planted_patch(clip):
    model, preprocess = clip
    layout = model.token_layout
    assert layout.grid_size == (4, 4)
    black = Image.new("RGB", (32, 32), (0, 0, 0))
    with torch.no_grad():
        base = _embed_acts(model, preprocess, [black, _square_image(1, 3)])
        position = layout.n_prefix + 1 * 4 + 3
        direction = base[1, position] - base[0, position]  # a white patch minus a black one, same position
        direction = direction / direction.norm()
        on = float(base[1, position] @ direction)
        off = float((base[0, layout.n_prefix :] @ direction).max())
    assert on - off > 1.0
    atoms = torch.cat([direction[None], orthonormal_directions(3, model.cfg.d_model, seed=1)])
    sae = planted_sae(atoms, "hook_embed", token_selection="patches", model_name=model.spec)
    with torch.no_grad():
        sae.b_enc[0] = -(on + off) / 2  # fires on white patches only
    squares = [(0, 0), (1, 3), (3, 1), (2, 2)]
    images = [_square_image(r, c) for r, c in squares] + synthetic_images(4, size=32, seed=3)
    images[4:] = [Image.new("RGB", (32, 32), (0, 0, 0))] * 4
    data = collect_dashboard_data(model, sae, images, preprocess, latents=[0, 1], top_k=4)
    card = data.cards[0]
    assert len(data.cards) == 2 and card.latent == 0
    assert sorted(top.index for top in card.top) == [0, 1, 2, 3]  # only the images with a white square
    for top in card.top:
        heatmap = top.heatmap
        assert heatmap.shape == (4, 4)
        peak = divmod(int(heatmap.argmax()), 4)
        assert peak == squares[top.index]
        assert (heatmap > 0).sum() == 1
    assert card.frequency == pytest.approx(4 / (8 * 16))
    assert data.summary["n_rows"] == 8 * 16 and data.summary["token_selection"] == "patches"


def test_fvu_l0_points_and_plot(tmp_path):
    atoms = orthonormal_directions(6, 12, seed=2)
    sae = planted_sae(atoms, "hook_image_embed")
    rows = torch.rand(50, 6) @ atoms  # nonnegative mixtures: reconstructed exactly
    [point] = fvu_l0_points(sae, rows, label="planted")
    assert point["fvu"] < 1e-8 and point["l0"] == pytest.approx(6.0)
    png = plot_fvu_vs_l0([point, {"label": "b", "group": "other", "l0": 2.0, "fvu": 0.3}], tmp_path / "p.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.png").read_bytes() == png
    assert Image.open(tmp_path / "p.png").size[0] > 300


def _chromium_or_fail():
    try:
        return find_chromium()
    except ChromiumNotFound as err:
        pytest.fail(str(err))


def test_dashboard_opens_in_chromium_without_console_errors(clip, tmp_path):
    chromium = _chromium_or_fail()
    model, preprocess = clip
    sae = make_sae(
        model.cfg.d_model, 48, "blocks.1.hook_resid_post", token_selection="cls", model_name=model.spec
    )
    images = synthetic_images(24, size=48, seed=5)
    small = make_sae(model.cfg.d_model, 16, "blocks.1.hook_resid_post", token_selection="cls", seed=1)
    paths = write_dashboard(
        model,
        sae,
        images,
        tmp_path,
        preprocess=preprocess,
        n_latents=6,
        top_k=5,
        extra_saes=[("small", small)],
    )
    html_text = paths["html"].read_text()
    assert "http://" not in html_text and "https://" not in html_text  # self-contained
    screenshot = tmp_path / "dashboard.png"
    report = open_page(paths["html"], screenshot=screenshot, window_size=(1300, 1400), chromium=chromium)
    print(f"dashboard screenshot: {screenshot}")
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.console == [], report.console
    assert report.body_attribute("data-status") == "ok"
    assert report.body_attribute("data-cards") == "6"
    assert report.count("latent-card") == 6
    assert report.screenshot is not None and Image.open(report.screenshot).size == (1300, 1400)
    summary = json.loads(paths["summary"].read_text())
    assert len(summary["latents"]) == 6 and len(summary["points"]) == 2


def test_chromium_check_catches_script_errors(tmp_path):
    chromium = _chromium_or_fail()
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>"
        "<script>console.error('boom');</script><script>undefinedFunction();</script></body></html>"
    )
    report = open_page(page, chromium=chromium)
    assert any("boom" in line for line in report.console)
    assert any("undefinedFunction" in line for line in report.console)


def test_cli_writes_dashboard_for_a_saved_sae(clip, tmp_path, capsys):
    """`sae-vision dashboard` rebuilds the model from the SAE's metadata (here the random init of seed 0, the
    `clip` fixture's weights): the FVU it prints is the one measured on that model."""
    from sae_vision_ext.commands.dashboard import main
    from sae_vision_ext.vision.load import weights_record

    model, preprocess = clip
    sae = make_sae(
        model.cfg.d_model, 32, "blocks.0.hook_resid_post", token_selection="all", model_name=model.spec
    )
    sae.cfg.metadata.weights = weights_record(model.spec, pretrained=False, seed=0)
    sae.save_model(tmp_path / "sae")
    code = main(
        [
            "--sae",
            str(tmp_path / "sae"),
            "--synthetic",
            "10",
            "--output",
            str(tmp_path / "out"),
            "--n-latents",
            "4",
            "--top-k",
            "3",
            "--batch-size",
            "4",
            "--quiet",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "dashboard.html" in captured.out and "fvu_vs_l0.png" in captured.out
    assert "RANDOM weights (seed 0)" in captured.err  # says which model it rebuilt
    summary = json.loads((tmp_path / "out" / "dashboard_summary.json").read_text())
    assert summary["summary"]["model"] == model.spec and len(summary["latents"]) == 4
    assert summary["summary"]["n_rows"] == 10 * model.token_layout.n_tokens
    assert (tmp_path / "out" / "fvu_vs_l0.png").stat().st_size > 1000
    images = synthetic_images(10, seed=0)  # what --synthetic 10 reads
    expected = collect_dashboard_data(
        model, sae, images, preprocess, n_latents=4, top_k=3, batch_size=4, heatmaps=False, progress=False
    ).summary
    assert summary["summary"]["fvu"] == pytest.approx(expected["fvu"], rel=1e-5)
    assert f"FVU {expected['fvu']:.4f}" in captured.out


def test_fvu_l0_curve_over_inference_k_for_the_matryoshka_sae():
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE, MatryoshkaTopKSAEConfig

    torch.manual_seed(0)
    sae = MatryoshkaTopKSAE(
        MatryoshkaTopKSAEConfig(d_in=16, d_sae=64, k_levels=[4, 16, 64], metadata=SAEMetadata(hook_name="h"))
    ).eval()
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every latent positive, so each k keeps exactly k latents
    rows = torch.randn(200, 16)
    points = fvu_l0_points(sae, rows, label="msae", ks=[2, 8, 32])
    assert [p["label"] for p in points] == ["k=2", "k=8", "k=32"]
    assert [p["l0"] for p in points] == [2.0, 8.0, 32.0]
    assert {p["group"] for p in points} == {"msae"}


def test_cards_show_concept_names_for_an_embedding_sae(clip):
    from sae_vision_ext.analysis.concepts import name_concepts
    from sae_vision_ext.analysis.dashboard import render_dashboard_html

    model, preprocess = clip
    d = model.cfg.d_image_embed
    sae = make_sae(d, 8, "hook_image_embed", model_name=model.spec, seed=4)
    words = ["zebra", "lighthouse", "<b>bold</b>"] + [f"word{i}" for i in range(20)]
    text = torch.randn(len(words), d, generator=torch.Generator().manual_seed(0))
    text[0], text[2] = sae.W_dec[0].detach(), sae.W_dec[1].detach()
    names = name_concepts(sae, words, text_embeddings=text, top_n=3)
    images = synthetic_images(6, size=32, seed=9)
    data = collect_dashboard_data(model, sae, images, preprocess, latents=[0, 1], top_k=2, names=names)
    assert [c.name for c in data.cards] == ["zebra", "<b>bold</b>"]
    assert all(top.heatmap is None for c in data.cards for top in c.top)  # pooled hook: no patches
    page = render_dashboard_html(data, images)
    assert '<span class="name">zebra</span>' in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page  # names are escaped


def test_sae_vision_dashboard_subcommand_help(capsys):
    from sae_vision_ext import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dashboard", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--sae" in out and "examples:" in out and "sae-vision dashboard --sae" in out
    assert "--dataset" in out and "--output" in out and "--no-pretrained" not in out
