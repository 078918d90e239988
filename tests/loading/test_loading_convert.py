"""``sae-vision convert``: foreign checkpoint -> SAELens folder (safetensors), loads with load_from_disk."""

import os
import re

import pytest
import torch
from test_loading_msae import L14, REPO, authors_checkpoint, authors_forward

from sae_vision_ext.commands import convert as convert_command
from sae_vision_ext.commands.convert import main
from sae_vision_ext.loading import register_releases
from sae_vision_ext.loading.convert import FORMATS, convert_checkpoint
from sae_vision_ext.loading.hub_cache import seed_hf_cache
from sae_vision_ext.loading.safe_load import UnsafeCheckpointError

register_releases()


def cli(*argv):
    return main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    """``sae-vision convert`` exits with code 2 and one line on stderr; returns that line."""
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sae-vision convert: error:"), err
    return err


def _load(folder):
    from sae_lens import SAE

    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    return SAE.load_from_disk(folder)


def test_convert_local_authors_file(tmp_path, capsys):
    ckpt, x = authors_checkpoint()
    torch.save(ckpt, tmp_path / "msae.pth")
    assert (
        cli(
            tmp_path / "msae.pth",
            tmp_path / "out",
            "--model",
            "open_clip:ViT-L-14/openai",
            "--hook",
            "hook_image_embed",
            "--k",
            "8",
        )
        == 0
    )
    assert "sae_weights.safetensors" in capsys.readouterr().out
    sae = _load(tmp_path / "out")
    assert sae.cfg.inference_k == 8 and sae.cfg.metadata.hook_name == "hook_image_embed"
    with torch.no_grad():
        torch.testing.assert_close(sae(x), authors_forward(ckpt, x, 8)[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(x, k=sae.cfg.d_sae), authors_forward(ckpt, x)[1], atol=1e-4, rtol=1e-4)


def test_convert_release_and_hub_file(tmp_path, hf_cache):
    ckpt, x = authors_checkpoint(seed=3)
    torch.save(ckpt, tmp_path / "msae.pth")
    seed_hf_cache(REPO, {L14["centered"]: tmp_path / "msae.pth"})
    cli("msae-clip-vit-l-14", tmp_path / "by-release", "--sae-id", "centered")
    cli(f"hf://{REPO}/{L14['centered']}", tmp_path / "by-path")
    for folder in ("by-release", "by-path"):
        sae = _load(tmp_path / folder)
        assert sae.cfg.metadata.model_name == "open_clip:ViT-L-14/openai"
        with torch.no_grad():
            torch.testing.assert_close(sae(x), authors_forward(ckpt, x)[1], atol=1e-4, rtol=1e-4)


def test_convert_overcomplete_state_dict(tmp_path):
    torch.manual_seed(0)
    W, b, D = torch.randn(20, 6), torch.randn(20), torch.randn(20, 6)
    torch.save(
        {"encoder.final_block.0.weight": W, "encoder.final_block.0.bias": b, "dictionary._weights": D},
        tmp_path / "sae.pt",
    )
    cli(tmp_path / "sae.pt", tmp_path / "out", "--format", "overcomplete", "--sparsity", "topk", "--k", "3")
    sae = _load(tmp_path / "out")
    x = torch.randn(4, 6)
    codes = torch.relu(x @ W.T + b)
    top = codes.topk(3, dim=-1)
    z = torch.zeros_like(codes).scatter(-1, top.indices, top.values)
    with torch.no_grad():
        torch.testing.assert_close(
            sae(x), z @ (D / (D.norm(dim=1, keepdim=True) + 1e-8)), atol=1e-5, rtol=1e-5
        )


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_convert_errors(tmp_path, hf_cache, capsys):
    assert re.search("pass --sae-id", fails(capsys, "msae-clip-vit-l-14", tmp_path / "out"))
    err = fails(capsys, "msae-l14", tmp_path / "out", "--sae-id", "centered")
    assert re.search("unknown release 'msae-l14'.*msae-clip-vit-l-14", err)
    assert "checkpoint not found" in fails(capsys, tmp_path / "typo.pth", tmp_path / "out")
    with pytest.raises(SystemExit):
        cli(tmp_path / "x.pth", tmp_path / "out", "--format", "pickle")
    assert "invalid choice" in capsys.readouterr().err
    torch.save({"model": _Payload()}, tmp_path / "evil.pth")
    assert "refused to unpickle" in fails(capsys, tmp_path / "evil.pth", tmp_path / "out")
    with pytest.raises(UnsafeCheckpointError):  # what the library raises
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "out")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for fmt in ("auto", "msae", "overcomplete"):
        err = fails(capsys, tmp_path / "garbage.pth", tmp_path / "out", "--format", fmt)
        assert "not a readable PyTorch checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_convert_reads_a_legacy_format_checkpoint(tmp_path):
    torch.manual_seed(0)
    W, b, D = torch.randn(20, 6), torch.randn(20), torch.randn(20, 6)
    state = {"encoder.final_block.0.weight": W, "encoder.final_block.0.bias": b, "dictionary._weights": D}
    torch.save(state, tmp_path / "sae.pt", _use_new_zipfile_serialization=False)  # not mmap-able
    assert cli(tmp_path / "sae.pt", tmp_path / "out", "--sparsity", "topk", "--k", "3") == 0  # format auto
    assert _load(tmp_path / "out").cfg.d_sae == 20


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        cli("--help")
    out = capsys.readouterr().out
    assert "sae-vision convert msae-clip-vit-l-14 out/msae-l14 --sae-id centered" in out


def test_the_command_offers_exactly_the_formats_the_converter_reads():
    assert convert_command.FORMATS == FORMATS  # spelled out in the command so that --help stays instant
