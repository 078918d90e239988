"""The analysis examples run end to end at tiny scale (subprocesses, as a user would run them)."""

import json

import pytest
import torch
from helpers import load_script, run_example
from PIL import Image

from sae_vision_ext.analysis.browser import find_chromium, open_page


def _run(script, *args, env_extra=None, timeout=300):
    completed = run_example(f"examples/{script}", *args, env=env_extra, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.parametrize("script", ["steer.py", "name_concepts.py", "dashboard.py"])
def test_help_has_an_example(script):
    out = _run(script, "--help")
    assert "examples:" in out and f"examples/{script}" in out


def test_steer_example_tiny():
    """The test rebuilds the example's tiny model, SAE and photos and steers them itself: adding the 'dog'
    text direction raises p(dog), and the table the example prints holds the same probabilities."""
    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.analysis.bias import zero_shot_from_prompts
    from sae_vision_ext.analysis.steering import steer
    from sae_vision_ext.analysis.toy import tiny_clip

    example = load_script("examples/steer.py")
    out = _run("steer.py", "--tiny", "--strengths", "0,1")
    model, preprocess = tiny_clip()
    sae = example.demonstration_sae(model, "a photo of a dog")
    images = torch.stack([preprocess(image) for image in sample_images(4)])
    classify = zero_shot_from_prompts(model, example.PROMPTS)
    with torch.no_grad():
        unit = float(model(images).norm(dim=-1).mean())
        measured = []
        for strength in (0.0, 1.0):
            with steer(model, sae, latents=0, mode="add", value=strength * unit):
                measured.append(classify(model(images)).softmax(dim=-1).mean(dim=0))
    dog = example.PROMPTS.index("a photo of a dog")
    assert measured[1][dog] > measured[0][dog]
    lines = [line for line in out.splitlines() if line.strip().startswith(("0.00", "1.00"))]
    printed = [[float(v) for v in line.split("|")[1:]] for line in lines]
    assert printed == [pytest.approx(m.tolist(), abs=2e-3) for m in measured]


def test_name_concepts_example_tiny(tmp_path):
    """The test compares each latent's best word with the word planted in it (both columns of the table) and
    checks the cached text embeddings the example wrote."""
    from safetensors.torch import load_file

    out = _run(
        "name_concepts.py", "--tiny", "--n-latents", "6", env_extra={"SAE_VISION_CACHE": str(tmp_path)}
    )
    table = [
        line.split("|")
        for line in out.splitlines()
        if line.count("|") == 2 and line.split("|")[0].strip().isdigit()
    ]
    assert len(table) == 6
    for _, best_words, planted in table:
        assert best_words.split()[0] == planted.strip()
    [cache] = tmp_path.glob("text_embeddings/*.safetensors")
    embeddings = next(iter(load_file(str(cache)).values()))
    assert embeddings.shape[0] == 1000  # --tiny: the first 1000 words of the shipped vocabulary
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(1000), atol=1e-4)


def test_dashboard_example_tiny(tmp_path):
    """The test opens the page the example wrote in headless Chromium itself and reads its summary."""
    out = _run("dashboard.py", "--tiny", "--out", str(tmp_path), "--check")
    assert "status=ok" in out
    report = open_page(tmp_path / "dashboard.html", chromium=find_chromium())
    assert report.console == [] and report.body_attribute("data-status") == "ok"
    summary = json.loads((tmp_path / "dashboard_summary.json").read_text())
    assert report.body_attribute("data-cards") == str(len(summary["latents"])) == "12"
    assert report.count("latent-card") == 12
    assert all(0.0 <= point["fvu"] and point["l0"] > 0 for point in summary["points"])
    assert Image.open(tmp_path / "fvu_vs_l0.png").size[0] > 300
    assert Image.open(tmp_path / "dashboard.png").size[0] > 300
