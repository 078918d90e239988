"""ViT-Prisma's SAEs (``Prisma-Multimodal/*``) by release name, from a local HF cache, against their forward.

The files are written here in the published layout (``sae_vision_ext/loading/prisma.py``): one repo per SAE
holding ``config.json`` (ViT-Prisma's ``VisionModelSAERunnerConfig`` as JSON) and the weights, either
``n_images_2600058.pt`` = ``torch.save({"cfg": <pickled VisionModelSAERunnerConfig>, "state_dict": ...})``
or ``weights.pt`` = the bare state dict (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``; gated: ``b_gate``, ``r_mag``, ``b_mag``). The reference below is ViT-Prisma's forward written
from its formula: ``z = act((N(x) - b_dec) W_enc + b_enc)``, ``x_hat = N^-1(z W_dec + b_dec)``.
"""

import dataclasses
import json
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch

from sae_vision_ext.loading import RELEASES, register_releases
from sae_vision_ext.loading.hub_cache import seed_hf_cache
from sae_vision_ext.loading.prisma import parse_prisma, prisma_huggingface_loader, split_location
from sae_vision_ext.loading.releases import PRISMA_LOADER, release_metadata
from sae_vision_ext.loading.safe_load import UnsafeCheckpointError

register_releases()
NS = "Prisma-Multimodal"
CLIP_SPEC = "open_clip:ViT-B-32/datacomp_xl_s13b_b90k"
CLIP_PRISMA = "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"
D, X = 16, 4  # d_in, expansion factor (the releases are 768 x 64)
ALL = "prisma-clip-vit-b-32-x64-all"
TOPK_CLS = "prisma-clip-vit-b-32-topk64-cls"


def prisma_config(layer, subtype, d_in=D, expansion=X, **changes):
    """config.json as ViT-Prisma's ``save_config`` wrote it for the released CLIP SAEs (asdict + records)."""
    cfg = {
        "model_class_name": "HookedViT",
        "model_name": CLIP_PRISMA,
        "vit_model_cfg": None,
        "model_path": None,
        "hook_point_layer": layer,
        "layer_subtype": subtype,
        "hook_point_head_index": None,
        "context_size": 50,
        "use_cached_activations": False,
        "use_patches_only": False,
        "cached_activations_path": f"activations/_imagenet/{CLIP_PRISMA}/blocks.{layer}.{subtype}",
        "d_in": d_in,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "cls_token_only": False,
        "max_grad_norm": 1.0,
        "initialization_method": "encoder_transpose_decoder",
        "normalize_activations": "layer_norm",
        "n_batches_in_buffer": 20,
        "store_batch_size": 32,
        "num_workers": 16,
        "num_epochs": 2,
        "total_training_images": 2_600_000,
        "total_training_tokens": 130_000_000,
        "image_size": 224,
        "device": {"__type__": "torch.device", "value": "cuda"},
        "seed": 42,
        "dtype": {"__type__": "torch.dtype", "value": "torch.float32"},
        "architecture": "standard",
        "verbose": False,
        "b_dec_init_method": "geometric_median",
        "expansion_factor": expansion,
        "from_pretrained_path": None,
        "d_sae": d_in * expansion,
        "l1_coefficient": 1e-05,
        "lp_norm": 1,
        "lr": 0.0004,
        "lr_scheduler_name": "cosineannealingwarmup",
        "lr_warm_up_steps": 200,
        "train_batch_size": 4096,
        "dataset_name": "imagenet1k",
        "use_ghost_grads": True,
        "log_to_wandb": True,
        "n_checkpoints": 10,
    }
    cfg.update(changes)
    return cfg


def prisma_weights(d_in=D, d_sae=D * X, seed=0, gated=False):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)
    sd = OrderedDict(
        W_enc=W_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=g),
        b_enc=0.05 * torch.randn(d_sae, generator=g) - 0.02,
        W_dec=W_dec,
        b_dec=0.2 * torch.randn(d_in, generator=g),
    )
    if gated:
        sd["b_gate"] = 0.05 * torch.randn(d_sae, generator=g)
        sd["r_mag"] = 0.1 * torch.randn(d_sae, generator=g)
        sd["b_mag"] = 0.05 * torch.randn(d_sae, generator=g)
    return sd


def prisma_forward(cfg, sd, x):
    """ViT-Prisma's inference (module docstring of loading/prisma.py), in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    norm = cfg["normalize_activations"]
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        xn = (x - mu) / (std + 1e-5)
    elif norm == "constant_norm_rescale":
        coeff = cfg["d_in"] ** 0.5 / x.norm(dim=-1, keepdim=True)
        xn = x * coeff
    else:
        xn = x
    u = xn - sd["b_dec"]
    if cfg["architecture"] == "gated":
        active = (u @ sd["W_enc"] + sd["b_gate"] > 0).double()
        z = active * torch.relu(u @ (sd["W_enc"] * sd["r_mag"].exp()) + sd["b_mag"])
    else:
        pre = u @ sd["W_enc"] + sd["b_enc"]
        if cfg["activation_fn_str"] == "topk":
            top = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        else:
            z = torch.relu(pre)
    out = z @ sd["W_dec"] + sd["b_dec"]
    if norm == "layer_norm":
        out = out * std + mu
    elif norm == "constant_norm_rescale":
        out = out / coeff
    return z, out


@pytest.fixture
def pickled_config_class(monkeypatch):
    """ViT-Prisma's config class in a stand-in module, for pickling it (ViT-Prisma is not installed)."""
    for name in ("vit_prisma", "vit_prisma.sae"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("vit_prisma.sae.config")

    @dataclasses.dataclass
    class VisionModelSAERunnerConfig:
        d_in: int = D
        model_name: str = CLIP_PRISMA
        device: object = None
        dtype: object = torch.float32

    VisionModelSAERunnerConfig.__module__ = module.__name__
    VisionModelSAERunnerConfig.__qualname__ = "VisionModelSAERunnerConfig"
    module.VisionModelSAERunnerConfig = VisionModelSAERunnerConfig
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return VisionModelSAERunnerConfig


def save_training_checkpoint(path, cfg_dict, sd, config_class):
    """``save_model``'s layout: {"cfg": the config object, "state_dict": the module's state dict}."""
    cfg = config_class(device=torch.device("cuda"))
    for key, value in cfg_dict.items():  # the real object carries every field (and hook_point)
        setattr(cfg, key, value["value"] if isinstance(value, dict) and "__type__" in value else value)
    cfg.hook_point = f"blocks.{cfg_dict['hook_point_layer']}.{cfg_dict['layer_subtype']}"
    torch.save({"cfg": cfg, "state_dict": sd}, path)


def serve(repo_name, files, tmp_path):
    """Write ``{name: dict (json) | state dict | path}`` into the cache as Prisma-Multimodal/<repo_name>."""
    out = {}
    for name, content in files.items():
        if isinstance(content, (bytes, os.PathLike)):
            out[name] = content
        elif name.endswith(".json"):
            out[name] = json.dumps(content, indent=4).encode()
        else:
            local = tmp_path / f"{repo_name}-{name}"
            torch.save(content, local)
            out[name] = local
    seed_hf_cache(f"{NS}/{repo_name}", out)


def test_releases_are_registered_with_per_repo_paths():
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    lookup = directory[ALL]
    assert lookup.repo_id == NS and lookup.conversion_func == PRISMA_LOADER
    assert len(lookup.saes_map) == 24 and lookup.model == CLIP_SPEC
    assert lookup.saes_map["blocks.8.hook_mlp_out"] == (
        "sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-8-hook_mlp_out-l1-1e-05"
    )
    assert lookup.saes_map["blocks.11.hook_mlp_out"].endswith("-l1-5e-05")
    assert "hook_name" not in lookup.config_overrides  # per SAE, from its config.json
    assert lookup.config_overrides["token_selection"] == "all"
    assert PRISMA_LOADER in loaders.NAMED_PRETRAINED_SAE_LOADERS
    assert PRISMA_LOADER in loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS
    sizes = {name: len(RELEASES[name].saes) for name in RELEASES if name.startswith("prisma-")}
    assert sizes == {
        ALL: 24,
        "prisma-clip-vit-b-32-x64-cls": 12,
        TOPK_CLS: 12,
        "prisma-clip-vit-b-32-x64-patches": 11,
        "prisma-dino-vit-b-16-x64-all": 12,
    }
    assert RELEASES["prisma-dino-vit-b-16-x64-all"].model == "timm:vit_base_patch16_224.dino"
    for name in sizes:
        for sae_id in RELEASES[name].saes:  # every sae id is the hook its repo name says
            layer = sae_id.split(".")[1]
            assert sae_id.startswith("blocks.") and f"{layer}-" in RELEASES[name].saes[sae_id]
    path = RELEASES[TOPK_CLS].saes["blocks.3.hook_resid_post"]
    assert release_metadata(NS, path) == {
        "model_name": CLIP_SPEC,
        "dataset_path": "imagenet1k",
        "token_selection": "cls",
    }
    assert split_location(NS, path) == (f"{NS}/{path}", None)
    assert split_location(NS, f"{path}/weights.pt") == (f"{NS}/{path}", "weights.pt")
    assert split_location(f"{NS}/{path}", "n_images_2600058.pt") == (f"{NS}/{path}", "n_images_2600058.pt")


def test_vanilla_layer_norm_sae_from_training_checkpoint(hf_cache, tmp_path, pickled_config_class):
    from sae_lens import SAE
    from sae_lens.saes.standard_sae import StandardSAE

    sae_id = "blocks.8.hook_mlp_out"
    cfg = prisma_config(8, "hook_mlp_out")
    sd = prisma_weights(seed=1)
    ckpt = tmp_path / "n_images_2600058.pt"
    save_training_checkpoint(ckpt, cfg, sd, pickled_config_class)
    serve(RELEASES[ALL].saes[sae_id], {"config.json": cfg, "n_images_2600058.pt": ckpt}, tmp_path)

    sae = SAE.from_pretrained(ALL, sae_id)
    assert type(sae) is StandardSAE
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.normalize_activations) == (D, D * X, "layer_norm")
    meta = sae.cfg.metadata
    assert meta.hook_name == sae_id and meta.model_name == CLIP_SPEC and meta.token_selection == "all"
    assert meta.prisma_model_name == CLIP_PRISMA and meta.modality == "vision"
    assert meta.source == f"hf://{NS}/{RELEASES[ALL].saes[sae_id]}/n_images_2600058.pt"
    assert meta.l1_coefficient == 1e-05 and meta.image_size == 224

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 50, D, generator=g) * 2 + torch.randn(D, generator=g)  # tokens of two images
    z_ref, x_hat_ref = prisma_forward(cfg, sd, x)
    with torch.no_grad():
        z = sae.encode(x)
        assert 0.05 < (z > 0).float().mean() < 0.95
        torch.testing.assert_close(z.double(), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).double(), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_topk_cls_sae_from_bare_state_dict(hf_cache, tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKSAE

    sae_id = "blocks.3.hook_resid_post"
    cfg = prisma_config(
        3,
        "hook_resid_post",
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 6},
        cls_token_only=True,
        context_size=1,
        normalize_activations="none",
    )
    sd = prisma_weights(seed=2)
    serve(RELEASES[TOPK_CLS].saes[sae_id], {"config.json": cfg, "weights.pt": dict(sd)}, tmp_path)

    sae = SAE.from_pretrained(TOPK_CLS, sae_id, dtype="float64")
    assert type(sae) is TopKSAE and sae.cfg.k == 6 and sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata.token_selection == "cls" and sae.cfg.metadata.hook_name == sae_id
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3
    z_ref, x_hat_ref = prisma_forward(cfg, sd, x)
    with torch.no_grad():
        z = sae.encode(x)
        assert ((z > 0).sum(-1) <= 6).all() and (z > 0).sum() > 32
        torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-9, rtol=1e-7)


def test_gated_constant_norm_sae_by_repo_id_with_config_only_in_checkpoint(
    hf_cache, tmp_path, pickled_config_class
):
    from sae_lens import SAE
    from sae_lens.saes.gated_sae import GatedSAE

    repo = "8e32860c-clip-b-sae-gated-all-tokens-x64-layer-9-mlp-out-v1"
    cfg = prisma_config(
        9, "hook_mlp_out", architecture="gated", normalize_activations="constant_norm_rescale"
    )
    sd = prisma_weights(seed=3, gated=True)
    ckpt = tmp_path / "gated.pt"
    save_training_checkpoint(ckpt, cfg, sd, pickled_config_class)
    serve(repo, {"n_images_2600058.pt": ckpt}, tmp_path)  # no config.json: the pickled one is read

    sae = SAE.from_pretrained(f"{NS}/{repo}", "", converter=prisma_huggingface_loader)
    assert type(sae) is GatedSAE and sae.cfg.normalize_activations == "constant_norm_rescale"
    assert sae.cfg.metadata.hook_name == "blocks.9.hook_mlp_out"
    assert sae.cfg.metadata.model_name == CLIP_SPEC  # ViT-Prisma's name mapped to the plugin's spec
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(7)) * 4 + 1
    z_ref, x_hat_ref = prisma_forward(cfg, sd, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).double(), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_add_sae_splices_at_the_config_hook_on_cls_tokens(hf_cache, tmp_path):
    """The release's metadata is what ``add_sae`` reads: the hook and, for a CLS-only SAE, the CLS token."""
    from sae_lens import SAE

    from sae_vision_ext.analysis.toy import synthetic_images, tiny_timm_vit

    model, preprocess = tiny_timm_vit(seed=0, registers=0)
    d = model.cfg.d_model
    hook = "blocks.1.hook_resid_post"
    cfg = prisma_config(
        1, "hook_resid_post", d_in=d, expansion=2, cls_token_only=True, normalize_activations="none"
    )
    sd = prisma_weights(d_in=d, d_sae=2 * d, seed=4)
    serve(
        RELEASES["prisma-clip-vit-b-32-x64-cls"].saes[hook], {"config.json": cfg, "weights.pt": sd}, tmp_path
    )
    sae = SAE.from_pretrained("prisma-clip-vit-b-32-x64-cls", hook)
    images = torch.stack([preprocess(image) for image in synthetic_images(2, seed=1)])

    def replace_cls(acts, hook):
        acts = acts.clone()
        acts[:, 0] = prisma_forward(cfg, sd, acts[:, 0])[1].to(acts.dtype)
        return acts

    with torch.no_grad():
        expected = model.run_with_hooks(images, fwd_hooks=[(hook, replace_cls)])
        baseline = model(images)
        model.add_sae(sae)
        try:
            assert model.acts_to_saes == {hook: sae}
            spliced = model(images)
        finally:
            model.reset_saes()
    torch.testing.assert_close(spliced, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(spliced, baseline, atol=1e-4)


def test_malicious_checkpoint_is_refused_without_running_it(hf_cache, tmp_path):
    from sae_lens import SAE

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sae_id = "blocks.2.hook_mlp_out"
    ckpt = tmp_path / "evil.pt"
    torch.save({"cfg": Evil(), "state_dict": prisma_weights()}, ckpt)
    serve(
        RELEASES[ALL].saes[sae_id],
        {"config.json": prisma_config(2, "hook_mlp_out"), "n_images_2600058.pt": ckpt},
        tmp_path,
    )
    with pytest.raises(UnsafeCheckpointError, match="system"):
        SAE.from_pretrained(ALL, sae_id)
    assert not marker.exists()


def test_bad_inputs_give_clear_errors(hf_cache, tmp_path):
    from sae_lens import SAE

    sd = prisma_weights()
    cfg = prisma_config(4, "hook_resid_post")
    missing = {k: v for k, v in sd.items() if k != "b_dec"}
    serve(
        RELEASES[ALL].saes["blocks.4.hook_resid_post"], {"config.json": cfg, "weights.pt": missing}, tmp_path
    )
    with pytest.raises(ValueError, match=r"lacks 'b_dec'"):
        SAE.from_pretrained(ALL, "blocks.4.hook_resid_post")
    with pytest.raises(FileNotFoundError, match=r"weights.pt.*n_images_2600058.pt"):
        SAE.from_pretrained(ALL, "blocks.5.hook_resid_post")  # registered, nothing cached

    wrong = dict(sd, W_enc=sd["W_enc"][:, :-1])
    with pytest.raises(ValueError, match=r"W_enc has shape \[16, 63\], expected \[16, 64\]"):
        parse_prisma(cfg, wrong)
    with pytest.raises(ValueError, match="d_sae=99 but d_in \\* expansion_factor = 64"):
        parse_prisma({**cfg, "d_sae": 99}, sd)
    with pytest.raises(ValueError, match="transcoder"):
        parse_prisma({**cfg, "is_transcoder": True}, sd)
    with pytest.raises(ValueError, match="transcoder"):
        parse_prisma(cfg, dict(sd, W_skip=torch.zeros(D, D)))
    with pytest.raises(ValueError, match="'tanh-relu'.*no exact SAELens counterpart"):
        parse_prisma({**cfg, "activation_fn_str": "tanh-relu"}, sd)
    with pytest.raises(ValueError, match="positive integer k"):
        parse_prisma({**cfg, "activation_fn_str": "topk", "activation_fn_kwargs": {}}, sd)
    with pytest.raises(ValueError, match="per-head"):
        parse_prisma({**cfg, "hook_point_head_index": 3}, sd)
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in'"):
        parse_prisma({**cfg, "normalize_activations": "expected_average_only_in"}, sd)

    dino = prisma_config(6, "hook_resid_post", model_name="facebook/dino-vitb16")
    serve(RELEASES[ALL].saes["blocks.6.hook_resid_post"], {"config.json": dino, "weights.pt": sd}, tmp_path)
    with pytest.raises(ValueError, match="trained on facebook/dino-vitb16"):
        SAE.from_pretrained(ALL, "blocks.6.hook_resid_post")

    cls_release = "prisma-clip-vit-b-32-x64-cls"
    all_tokens = prisma_config(7, "hook_resid_post")  # cls_token_only False, under the CLS-only release
    serve(
        RELEASES[cls_release].saes["blocks.7.hook_resid_post"],
        {"config.json": all_tokens, "weights.pt": sd},
        tmp_path,
    )
    with pytest.warns(UserWarning, match="token_selection 'all'.*the release says 'cls'"):
        sae = SAE.from_pretrained(cls_release, "blocks.7.hook_resid_post")
    assert sae.cfg.metadata.token_selection == "cls"
