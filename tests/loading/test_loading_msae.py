"""The MSAE authors' release (WolodjaZ/MSAE) from a local HF cache, against their forward pass.

The files are written by this test in the published layout (see REFERENCE section 1): a ``torch.save``
dict with ``model`` = {pre_bias [d], encoder [d, n], latent_bias [n], decoder [n, d], counters},
``mean_center`` [d], ``scaling_factor`` (float) and ``target_norm`` (numpy float64).
"""

import math
import os
import zipfile

import numpy as np
import pytest
import torch

from sae_vision_ext.loading import RELEASES, register_releases
from sae_vision_ext.loading.hub_cache import seed_hf_cache
from sae_vision_ext.loading.msae import msae_huggingface_loader
from sae_vision_ext.loading.pretrained import load_pretrained
from sae_vision_ext.loading.safe_load import UnsafeCheckpointError
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE

register_releases()  # also done by ``import sae_vision_ext``; idempotent
REPO = "WolodjaZ/MSAE"
L14 = RELEASES["msae-clip-vit-l-14"].saes
B16_FILE = (
    "ViT-B_16/centered/4096_512_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-B~16_train_image_2905936_512.pth"
)
D, N = 24, 96


def authors_checkpoint(seed=0, centered=True, d=D, n=N):
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(n, d, generator=g)
    decoder /= decoder.norm(dim=-1, keepdim=True)  # the authors keep decoder rows at unit norm
    x = torch.randn(512, d, generator=g) * 3 + 5
    mean = x.mean(0) if centered else torch.zeros(d)
    scale = math.sqrt(d) / (x - mean).pow(2).sum(-1).mean().item()  # the authors' code: no sqrt below
    return {
        "model": {
            "pre_bias": 0.1 * torch.randn(d, generator=g),
            "encoder": decoder.T.clone() + 0.05 * torch.randn(d, n, generator=g),
            "latent_bias": 0.02 * torch.randn(n, generator=g),
            "decoder": decoder,
            "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
            "latents_activation_frequency": torch.rand(n, generator=g),
        },
        "mean_center": mean,
        "scaling_factor": scale,
        "target_norm": np.float64(math.sqrt(d)),
    }, x[:32]


def authors_forward(ckpt, x, k=None):
    """The authors' inference: standardise, encode, ReLU (or TopK then ReLU), decode, de-standardise."""
    m, s, mu = ckpt["model"], ckpt["scaling_factor"], ckpt["mean_center"]
    pre = ((x - mu) * s - m["pre_bias"]) @ m["encoder"] + m["latent_bias"]
    if k is None:
        z = torch.relu(pre)
    else:
        top = torch.topk(pre, k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return z, (z @ m["decoder"] + m["pre_bias"]) / s + mu


@pytest.fixture
def release(tmp_path, hf_cache):
    """The three published SAEs the tests use, written into the local cache; returns their checkpoints."""
    ckpts = {}
    files = {}
    for name, path, centered, seed in (
        ("l14c", L14["centered"], True, 0),
        ("l14u", L14["not_centered"], False, 1),
        ("b16c", B16_FILE, True, 2),
    ):
        ckpts[name], ckpts[name + "_x"] = authors_checkpoint(seed, centered)
        local = tmp_path / f"{name}.pth"
        torch.save(ckpts[name], local)
        files[path] = local
    files[B16_FILE.replace("/4096_", "/Concept_Interpreter_4096_").replace(".pth", "_disect.npy")] = (
        b"\x93NUMPY"
    )
    files["clip_disect_20k.txt"] = b"dog\ncat\n"
    seed_hf_cache(REPO, files)
    return ckpts


def test_release_by_name_equals_authors_forward(release):
    from sae_lens import SAE

    ckpt, x = release["l14c"], release["l14c_x"]
    sae = SAE.from_pretrained("msae-clip-vit-l-14", "centered")
    assert isinstance(sae, MatryoshkaTopKSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.inference_k) == (D, N, None)
    meta = sae.cfg.metadata
    assert meta.model_name == "open_clip:ViT-L-14/openai" and meta.hook_name == "hook_image_embed"
    assert meta.modality == "vision" and int(meta.sae_lens_version.split(".")[0]) >= 6
    assert meta.latent_scale == pytest.approx(ckpt["scaling_factor"])
    assert meta.target_norm == pytest.approx(math.sqrt(D))
    assert meta.training_level_weighting == "reverse" and meta.training_k_start == 64
    assert meta.source == f"hf://{REPO}/{L14['centered']}"

    z_ref, x_hat_ref = authors_forward(ckpt, x)
    s = ckpt["scaling_factor"]
    with torch.no_grad():
        z = sae.encode(x)  # ReLU by default, on RAW embeddings
        assert 0.05 < (z > 0).float().mean() < 0.95
        torch.testing.assert_close(z * s, z_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-4, rtol=1e-4)
        for k in (1, 8, 40):
            z_ref_k, x_hat_ref_k = authors_forward(ckpt, x, k)
            torch.testing.assert_close(sae.encode(x, k=k) * s, z_ref_k, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(sae(x, k=k), x_hat_ref_k, atol=1e-4, rtol=1e-4)


def test_not_centered_and_k_on_request(release):
    ckpt, x = release["l14u"], release["l14u_x"]
    sae = load_pretrained("msae-clip-vit-l-14", "not_centered", k=8)
    assert sae.cfg.inference_k == 8
    s = ckpt["scaling_factor"]
    torch.testing.assert_close(sae.b_dec.detach(), ckpt["model"]["pre_bias"] / s)
    z_ref, x_hat_ref = authors_forward(ckpt, x, 8)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x) * s, z_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="k must be in 1..d_sae=96"):
        load_pretrained("msae-clip-vit-l-14", "not_centered", k=1000)


def test_b16_release_resolves_the_published_file_by_pattern(release):
    from sae_lens import SAE

    sae = SAE.from_pretrained("msae-clip-vit-b-16", "centered")
    assert sae.cfg.metadata.model_name == "open_clip:ViT-B-16/openai"
    assert sae.cfg.metadata.source == f"hf://{REPO}/{B16_FILE}"
    _, x_hat_ref = authors_forward(release["b16c"], release["b16c_x"])
    with torch.no_grad():
        torch.testing.assert_close(sae(release["b16c_x"]), x_hat_ref, atol=1e-4, rtol=1e-4)


def test_repo_id_with_converter_config_getter_and_roundtrip(release, tmp_path):
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    with pytest.warns(UserWarning, match="msae-clip-vit-l-14"):
        sae = SAE.from_pretrained(REPO, L14["centered"], converter=msae_huggingface_loader)
    assert sae.cfg.metadata.model_name == "open_clip:ViT-L-14/openai"  # found from the path
    cfg = load_sae_config_from_huggingface("msae-clip-vit-l-14", "centered")
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"]) == (D, N, "matryoshka_topk")
    sae.save_model(tmp_path / "converted")
    again = SAE.load_from_disk(tmp_path / "converted")
    assert again.cfg.metadata.latent_scale == pytest.approx(release["l14c"]["scaling_factor"])
    x = release["l14c_x"]
    with torch.no_grad():
        torch.testing.assert_close(again(x, k=8), sae(x, k=8))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_file_at_the_release_path_is_refused(tmp_path, hf_cache):
    from sae_lens import SAE

    ckpt, _ = authors_checkpoint()
    marker = tmp_path / "pwned"
    ckpt["target_norm"] = _Payload(marker)
    torch.save(ckpt, tmp_path / "evil.pth")
    seed_hf_cache(REPO, {L14["centered"]: tmp_path / "evil.pth"})
    with pytest.raises(UnsafeCheckpointError, match="system.*not on sae-vision-ext's allow-list"):
        SAE.from_pretrained("msae-clip-vit-l-14", "centered")
    assert not marker.exists()


def _rewrite_pickle(src, dst, old, new):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)


def test_file_written_by_numpy1_loads(tmp_path, hf_cache):
    from sae_lens import SAE

    ckpt, x = authors_checkpoint()
    torch.save(ckpt, tmp_path / "a.pth")
    _rewrite_pickle(
        tmp_path / "a.pth", tmp_path / "b.pth", b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    seed_hf_cache(REPO, {L14["centered"]: tmp_path / "b.pth"})
    sae = SAE.from_pretrained("msae-clip-vit-l-14", "centered")
    with torch.no_grad():
        torch.testing.assert_close(sae(x), authors_forward(ckpt, x)[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda c: c["model"].__setitem__("decoder", torch.zeros(N, D + 1)),
            r"decoder has shape \[96, 25\], expected \[96, 24\]",
        ),
        (lambda c: c["model"].pop("latent_bias"), r"'model' lacks \['latent_bias'\]"),
        (lambda c: c.pop("model"), "expected a dict with a 'model' state dict"),
        (lambda c: c.__setitem__("scaling_factor", -1.0), "scaling_factor must be a positive finite number"),
        (
            lambda c: c.__setitem__("mean_center", torch.zeros(3)),
            r"mean_center has shape \[3\], expected \[24\]",
        ),
    ],
)
def test_bad_checkpoints_fail_clearly(tmp_path, hf_cache, break_it, message):
    from sae_lens import SAE

    ckpt, _ = authors_checkpoint()
    break_it(ckpt)
    torch.save(ckpt, tmp_path / "bad.pth")
    seed_hf_cache(REPO, {L14["centered"]: tmp_path / "bad.pth"})
    with pytest.raises(ValueError, match=message):
        SAE.from_pretrained("msae-clip-vit-l-14", "centered")


def test_uncentred_file_without_mean_center(tmp_path):
    from sae_vision_ext.loading.convert import convert_file

    ckpt, x = authors_checkpoint(centered=False)
    ckpt.pop("mean_center")
    torch.save(ckpt, tmp_path / "u.pth")
    sae = convert_file(tmp_path / "u.pth")  # format detected from the contents
    assert isinstance(sae, MatryoshkaTopKSAE)
    ckpt["mean_center"] = torch.zeros(D)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), authors_forward(ckpt, x)[1], atol=1e-4, rtol=1e-4)
