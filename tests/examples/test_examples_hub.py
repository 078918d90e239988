"""examples/load_from_hub.py runs end to end against a local HF cache it builds (--tiny)."""

from __future__ import annotations

from helpers import load_script, run_example

SCRIPT = "examples/load_from_hub.py"


def run(*args, timeout=600):
    return run_example(SCRIPT, *args, timeout=timeout)


def test_help_and_list(capsys):
    result = run("--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--tiny" in result.stdout
    module = load_script(SCRIPT)
    assert module.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert (
        "msae-clip-vit-l-14" in out
        and "ra-sae-dinov2-vitb14-reg-32k" in out
        and "ids: centered, not_centered" in out
    )


def test_tiny_loads_by_release_name_from_the_local_cache(tmp_path):
    cache = tmp_path / "cache"
    result = run(
        "--tiny",
        "--cache-dir",
        cache,
        "--img-size",
        "64",
        "--n-images",
        "2",
        "--k",
        "16",
        "--save-dir",
        tmp_path / "saved",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(RANDOM weights (seed 0))" in out  # --tiny: random weights, said in the model line
    assert "SAE msae-clip-vit-b-16/centered: matryoshka_topk d_in=512 d_sae=4096" in out
    assert "hook_image_embed" in out and "ReLU : cosine" in out and "TopK 16: cosine" in out
    assert "astronaut" in out and "top latents" in out
    assert list(cache.glob("models--WolodjaZ--MSAE/snapshots/*/ViT-B_16/centered/*_RW_*.pth"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    # the test reads the checkpoint the example converted and the SAE it saved: same atoms, same directions
    import torch
    from sae_lens import SAE

    import sae_vision_ext  # noqa: F401  (registers matryoshka_topk)

    [pth] = cache.glob("models--WolodjaZ--MSAE/snapshots/*/ViT-B_16/centered/*_RW_*.pth")
    decoder = torch.load(pth, weights_only=False)["model"]["decoder"].float()
    saved = SAE.load_from_disk(tmp_path / "saved")
    assert saved.W_dec.shape == decoder.shape == (4096, 512)
    cosines = torch.nn.functional.cosine_similarity(saved.W_dec.detach().float(), decoder, dim=-1)
    assert cosines.min() > 0.999
