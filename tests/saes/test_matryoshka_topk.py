"""Tests for the nested-TopK Matryoshka SAE (architecture ``matryoshka_topk``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_vision_ext
from sae_vision_ext.saes import nested_decode, register_architectures
from sae_vision_ext.saes.matryoshka_topk import (
    MatryoshkaTopKSAE,
    MatryoshkaTopKSAEConfig,
    MatryoshkaTopKTrainingSAE,
    MatryoshkaTopKTrainingSAEConfig,
    default_k_levels,
    estimate_input_standardization,
    level_weights,
)


def step_input(x, logging=False):
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=logging
    )


def make_training_sae(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_in=12, d_sae=64, k_levels=[2, 4, 8, 16, 64])
    cfg.update(kw)
    return MatryoshkaTopKTrainingSAE(MatryoshkaTopKTrainingSAEConfig(**cfg))


def randomize(sae, scale=0.3, bias_shift=0.0, seed=1):
    """Move parameters away from the tied init so every code path sees generic values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        sae.b_enc.add_(bias_shift)


# ------------------------------------------------------------------------------------------------------------
# reference: h separate dense decodes, written independently of the module
# ------------------------------------------------------------------------------------------------------------


def reference_loss(sae, x):
    cfg = sae.cfg
    if cfg.standardize_input:
        x = (x - sae.input_mean) * sae.input_scale
    W_dec = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True) if cfg.normalize_decoder else sae.W_dec
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    ranking = pre if cfg.normalize_decoder else pre * sae.W_dec.norm(dim=-1)
    per_level = []
    for k in cfg.k_levels:
        idx = ranking.topk(k, dim=-1).indices
        z = torch.zeros_like(pre).scatter(-1, idx, F.relu(pre.gather(-1, idx)))
        x_hat = z @ W_dec + sae.b_dec
        sq = (x_hat - x).pow(2).sum(-1)
        if cfg.reconstruction_loss == "nmse":  # distance to the dataset mean (standardised: 0) or batch mean
            centre = 0.0 if cfg.standardize_input else x.mean(0, keepdim=True)
            sq = sq / (x - centre).pow(2).sum(-1)
        per_level.append(sq.mean())
    weighting = cfg.level_weighting
    h = len(cfg.k_levels)
    if weighting == "uniform":
        a = [1.0] * h
    elif weighting == "reverse":
        a = [h - i + 1.0 for i in range(1, h + 1)]
    else:
        a = list(weighting)
    return sum(ai * li for ai, li in zip(a, per_level)) / sum(a), per_level


def grads(sae, loss):
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(level_weighting="reverse", reconstruction_loss="nmse"),
        dict(level_weighting=[0.5, 0.0, 2.0, 1.0, 3.0], normalize_decoder=False),
        dict(k_levels=[3, 24, 40], level_weighting="reverse"),  # no ReLU level, wide bands
        dict(standardize_input=True, reconstruction_loss="nmse"),
    ],
    ids=["uniform-mse", "reverse-nmse", "explicit-unnormalised", "no-relu-level", "standardised"],
)
@pytest.mark.parametrize("bias_shift", [0.0, -0.9], ids=["half-active", "few-active"])
@pytest.mark.parametrize(
    "gather_cost, dense_cost",
    [(1e-3, 1e3), (8.0, 1.0), (1e3, 1e-3), (2.0, 0.2)],
    ids=["gather", "measured", "dense", "mixed"],
)
def test_loss_and_gradients_match_h_dense_decodes(monkeypatch, options, bias_shift, gather_cost, dense_cost):
    monkeypatch.setattr(nested_decode, "GATHER_COST", gather_cost)
    monkeypatch.setattr(nested_decode, "DENSE_LEVEL_COST", dense_cost)
    sae = make_training_sae(dtype="float64", **options)
    randomize(sae, bias_shift=bias_shift)
    x = torch.randn(40, 12, dtype=torch.float64) * 1.5 + 0.3
    if sae.cfg.standardize_input:
        sae.set_input_standardization(x.mean(0) + 0.1, 0.7)
    if (
        sae.cfg.normalize_decoder
    ):  # the forward renormalises W_dec in place; do it first for the reference too
        sae.set_decoder_norm_to_unit_norm()
    out = sae.training_forward_pass(step_input(x))
    ref, ref_levels = reference_loss(sae, x)
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-8)
    for k, ref_level in zip(sae.cfg.k_levels, ref_levels):
        assert torch.allclose(out.losses[f"{sae.cfg.reconstruction_loss}_loss_k{k}"], ref_level, rtol=1e-5)
    for g_fast, g_ref in zip(grads(sae, out.loss), grads(sae, ref)):
        assert torch.allclose(g_fast, g_ref, rtol=1e-5, atol=1e-7), (g_fast - g_ref).abs().max()


@pytest.mark.parametrize("plan", ["auto", "gather", "dense"])
def test_training_step_on_the_device_matches_the_reference_for_each_decode_plan(device, plan):
    sae = make_training_sae(dtype="float64", device=str(device), decode_plan=plan, level_weighting="reverse")
    randomize(sae.cpu())
    sae.to(device)
    x = (torch.randn(40, 12, dtype=torch.float64) * 1.5 + 0.3).to(device)
    sae.set_decoder_norm_to_unit_norm()
    out = sae.training_forward_pass(step_input(x))
    ref, _ = reference_loss(sae, x)
    assert out.loss.device.type == device.type
    assert torch.allclose(out.loss, ref, rtol=1e-6)
    for g_fast, g_ref in zip(grads(sae, out.loss), grads(sae, ref)):
        assert torch.allclose(g_fast, g_ref, rtol=1e-5, atol=1e-8)


def test_bfloat16_autocast_step_keeps_float32_weights_and_the_float32_loss(device):
    """SAELens trains mixed precision with ``torch.autocast`` around the step and float32 master weights."""
    sae = make_training_sae(device=str(device), level_weighting="reverse").to(device)
    x = torch.randn(64, 12, device=device)
    sae.set_decoder_norm_to_unit_norm()
    full = sae.training_forward_pass(step_input(x)).loss
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mixed = sae.training_forward_pass(step_input(x)).loss
    mixed.backward()
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())
    assert torch.isfinite(mixed) and abs(mixed.item() - full.item()) <= 0.05 * full.item()


def test_unknown_decode_plan_fails_at_config_time():
    with pytest.raises(ValueError, match="decode_plan must be one of auto, gather, dense"):
        MatryoshkaTopKTrainingSAEConfig(d_in=4, d_sae=8, k_levels=[2, 8], decode_plan="fastest")


def test_float32_gradients_match_reference():
    sae = make_training_sae(d_in=24, d_sae=256, k_levels=[4, 16, 64, 128, 256], level_weighting="reverse")
    randomize(sae, scale=0.05)
    x = torch.randn(128, 24)
    sae.set_decoder_norm_to_unit_norm()
    out = sae.training_forward_pass(step_input(x))
    ref, _ = reference_loss(sae, x)
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    for g_fast, g_ref in zip(grads(sae, out.loss), grads(sae, ref)):
        scale = g_ref.abs().max()
        assert (g_fast - g_ref).abs().max() <= 1e-5 * scale


# ------------------------------------------------------------------------------------------------------------
# levels, weights, nested supports
# ------------------------------------------------------------------------------------------------------------


def test_default_ladder_matches_authors():
    assert default_k_levels(6144) == [64, 128, 256, 512, 1024, 2048, 4096, 6144]
    assert default_k_levels(100) == [64, 100]
    assert default_k_levels(48) == [48]
    assert MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=512).k_levels == [64, 128, 256, 512]
    assert MatryoshkaTopKSAEConfig(d_in=8, d_sae=512).k_levels == [64, 128, 256, 512]


def test_uniform_and_reverse_weights():
    assert level_weights("uniform", 4) == [0.25] * 4
    assert level_weights("reverse", 4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert level_weights([1, 3], 2) == [0.25, 0.75]
    assert level_weights("2, 2, 4", 3) == [0.25, 0.25, 0.5]
    sae = make_training_sae(level_weighting="reverse")
    out = sae.training_forward_pass(step_input(torch.randn(16, 12)))
    per_level = [out.losses[f"mse_loss_k{k}"] for k in sae.cfg.k_levels]
    expected = sum(w * v for w, v in zip([5, 4, 3, 2, 1], per_level)) / 15
    assert torch.allclose(out.loss.detach(), expected, rtol=1e-6)


def test_supports_are_nested_and_reconstructions_api_matches_encode_decode():
    sae = make_training_sae(seed=4)
    randomize(sae)
    sae.set_decoder_norm_to_unit_norm()
    x = torch.randn(20, 12)
    with torch.no_grad():
        supports = [sae.encode(x, k=k) != 0 for k in (2, 4, 8, 16, None)]
        for small, large in zip(supports[:-1], supports[1:]):
            assert not (small & ~large).any()
        assert (supports[0].sum(-1) <= 2).all() and (supports[-2].sum(-1) <= 16).all()
        many = sae.reconstructions(x, ks=[16, 2, None, 8])
        assert list(many) == [16, 2, None, 8]
        for k, x_hat in many.items():
            assert torch.allclose(x_hat, sae.decode(sae.encode(x, k=k)), atol=1e-5)


def test_encode_uses_config_default_and_per_call_override():
    torch.manual_seed(0)
    sae = MatryoshkaTopKSAE(MatryoshkaTopKSAEConfig(d_in=10, d_sae=40, k_levels=[4, 40], inference_k=5))
    randomize(sae)
    x = torch.randn(8, 10)
    with torch.no_grad():
        assert ((sae.encode(x) != 0).sum(-1) <= 5).all()
        assert ((sae.encode(x, k=3) != 0).sum(-1) <= 3).all()
        relu = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        assert torch.allclose(sae.encode(x, k=40), relu, atol=1e-6)
        sae.cfg.inference_k = None
        assert torch.allclose(sae.encode(x), relu, atol=1e-6)
        assert torch.allclose(sae(x), relu @ sae.W_dec + sae.b_dec, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# configuration errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_cls", [MatryoshkaTopKSAEConfig, MatryoshkaTopKTrainingSAEConfig])
@pytest.mark.parametrize(
    "k_levels, message",
    [
        ([8, 4, 16], "strictly increasing"),
        ([4, 4, 16], "strictly increasing"),
        ([4, 65], "larger than d_sae=64"),
        ([], "must not be empty"),
        ([0, 4], "must be positive"),
        ([-2, 4], "must be positive"),
        ([2.5, 4], "integers"),
    ],
)
def test_bad_k_levels_fail_at_config_time(cfg_cls, k_levels, message):
    with pytest.raises(ValueError, match=message):
        cfg_cls(d_in=8, d_sae=64, k_levels=k_levels)


@pytest.mark.parametrize(
    "weighting, message",
    [
        ([1.0, -1.0, 1.0], "non-negative"),
        ([0.0, 0.0, 0.0], "not all be zero"),
        ([1.0, 2.0], "2 weights but there are 3 k_levels"),
        ("sideways", "'uniform', 'reverse'"),
    ],
)
def test_bad_level_weighting_fails_at_config_time(weighting, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=64, k_levels=[4, 8, 64], level_weighting=weighting)


def test_other_bad_options_fail_at_config_time():
    with pytest.raises(ValueError, match="inference_k"):
        MatryoshkaTopKSAEConfig(d_in=8, d_sae=64, inference_k=65)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=64, reconstruction_loss="l1")
    with pytest.raises(ValueError, match="standardize_scale"):
        MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=64, standardize_scale="median")


@pytest.mark.parametrize("old, new", [("paper", "mean_norm"), ("authors_code", "mean_squared_norm")])
def test_saved_configs_with_old_standardize_scale_names_still_load(old, new):
    """Training configs saved before issue 15 hold "paper" / "authors_code"; they load as the new names."""
    saved = MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=64, standardize_input=True).to_dict()
    saved["standardize_scale"] = old
    cfg = MatryoshkaTopKTrainingSAEConfig.from_dict(saved)
    assert cfg.standardize_scale == new
    sae = MatryoshkaTopKTrainingSAE(cfg)
    x = torch.randn(500, 8) * 2
    _, scale = sae.fit_input_standardization([x])
    assert scale == pytest.approx(estimate_input_standardization([x], scale=new)[1])


@pytest.mark.parametrize("k", [None, 4])
def test_error_term_forward_returns_the_input_and_hooks_see_one_pass(k):
    """SAELens's ``use_error_term`` contract with the extra ``k``: output = input, hooks fire for the main
    pass only (the clean pass that measures the error runs with the hooks disabled)."""
    torch.manual_seed(0)
    sae = MatryoshkaTopKSAE(MatryoshkaTopKSAEConfig(d_in=12, d_sae=64, k_levels=[4, 64]), use_error_term=True)
    randomize(sae)
    x = torch.randn(5, 12)
    seen = []
    sae.hook_sae_recons.add_hook(lambda value, hook: seen.append(value.clone()))
    out = sae(x, k=k)
    assert torch.allclose(out, x, atol=1e-5)
    assert len(seen) == 1 and torch.allclose(seen[0], sae.decode(sae.encode(x, k=k)), atol=1e-6)
    sae.use_error_term = False
    assert not torch.allclose(sae(x, k=k), x, atol=1e-3)


def test_wrong_input_width_names_both_widths():
    sae = make_training_sae()
    inference = MatryoshkaTopKSAE(MatryoshkaTopKSAEConfig(d_in=12, d_sae=64))
    for call in (
        lambda x: sae.training_forward_pass(step_input(x)),
        inference.encode,
        inference.reconstructions,
        inference,
    ):
        with pytest.raises(ValueError, match=r"d_in=12.*width 7"):
            call(torch.randn(5, 7))


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------


def sparse_data(n_rows, d=32, n_features=64, active=3, seed=0, offset=0.0, scale=1.0):
    """Rows = sum of `active` random unit features with positive magnitudes (ground-truth sparse code)."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n_features, d, generator=torch.Generator().manual_seed(99)), dim=-1)
    codes = torch.zeros(n_rows, n_features)
    idx = torch.rand(n_rows, n_features, generator=g).topk(active, dim=-1).indices
    codes.scatter_(-1, idx, 0.5 + torch.rand(n_rows, active, generator=g))
    return (codes @ features) * scale + offset


def batches(data, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(data.shape[0], generator=g)
        for i in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[perm[i : i + batch_size]]


def train(sae, data, steps=300, batch_size=256, lr=3e-3, checkpoint_path=None, n_checkpoints=0):
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        checkpoint_path=checkpoint_path,
        n_checkpoints=n_checkpoints,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(data, batch_size))
    trainer.fit()
    return trainer


def fvu(x, x_hat):
    x_hat = x_hat.detach()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_trains_on_synthetic_sparse_data_and_error_falls_with_k():
    data = sparse_data(6000)
    torch.manual_seed(0)
    sae = MatryoshkaTopKTrainingSAE(
        MatryoshkaTopKTrainingSAEConfig(
            d_in=32, d_sae=128, k_levels=[1, 2, 4, 8, 128], level_weighting="reverse"
        )
    )
    train(sae, data[:5000], steps=250)
    held_out = data[5000:]
    recons = sae.reconstructions(held_out, ks=[1, 2, 4, 8, None])
    errors = {k: fvu(held_out, x_hat) for k, x_hat in recons.items()}
    assert errors[None] < 0.1, errors
    values = list(errors.values())
    assert all(a >= b - 1e-4 for a, b in zip(values[:-1], values[1:])), errors
    assert values[0] > values[-1] + 0.05, errors


def test_decoder_rows_stay_unit_norm_and_gradients_are_tangent():
    data = sparse_data(2000, d=16, n_features=32)
    sae = make_training_sae(d_in=16, d_sae=48, k_levels=[2, 8, 48])
    seen = []
    original = sae.training_forward_pass

    def watched(step_input):
        out = original(step_input)
        seen.append(sae.W_dec.detach().norm(dim=-1).clone())
        return out

    sae.training_forward_pass = watched
    trainer = train(sae, data, steps=40, batch_size=100, lr=1e-2)
    assert len(seen) == 40
    for norms in seen:  # the forward of every step decoded with unit rows
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert trainer.n_training_steps == 40
    # after the last optimiser step the raw rows drifted a little; what is saved is unit norm
    out = original(step_input(data[:64]))
    out.loss.backward()
    radial = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1)
    assert radial.abs().max() <= 1e-6 * sae.W_dec.grad.norm()
    state = sae.state_dict()
    sae.process_state_dict_for_saving(state)
    assert torch.allclose(state["W_dec"].norm(dim=-1), torch.ones(48), atol=1e-6)


def test_training_with_standardised_inputs_takes_raw_activations():
    data = sparse_data(4000, offset=5.0, scale=40.0)
    sae = make_training_sae(d_in=32, d_sae=128, k_levels=[2, 4, 128], standardize_input=True)
    mean, scale = sae.fit_input_standardization(batches(data, 500), n_batches=4)
    assert torch.allclose(mean, data.mean(0), atol=2.0)
    train(sae, data, steps=200)
    x = data[:500]
    assert fvu(x, sae.reconstructions(x, ks=[None])[None]) < 0.1
    assert fvu(x, sae(x)) < 0.1  # inference takes and returns raw activations


def test_standardization_estimates_and_guards():
    torch.manual_seed(0)
    x = torch.randn(3000, 9) * 3 + 2
    mean, s_norm = estimate_input_standardization([x[:1000], x[1000:]], scale="mean_norm")
    _, s_squared = estimate_input_standardization([x], scale="mean_squared_norm")
    assert torch.allclose(mean, x.mean(0), atol=1e-5)
    assert (((x - mean) * s_norm).norm(dim=-1).mean() - 3.0).abs() < 1e-4  # sqrt(9)
    assert s_squared == pytest.approx(3.0 / (x - x.mean(0)).pow(2).sum(-1).mean().item(), rel=1e-5)
    # the spellings before issue 15 name the same estimates
    assert estimate_input_standardization([x], scale="paper")[1] == pytest.approx(s_norm, rel=1e-6)
    assert estimate_input_standardization([x], scale="authors_code")[1] == s_squared
    with pytest.raises(ValueError, match="at least one"):
        estimate_input_standardization([])

    inference = MatryoshkaTopKSAE(MatryoshkaTopKSAEConfig(d_in=9, d_sae=20, standardize_input=True))
    with pytest.raises(ValueError, match="never set"):
        inference.encode(x[:4])
    sae = make_training_sae(d_in=9, d_sae=20, k_levels=[2, 20], standardize_input=True)
    with pytest.warns(UserWarning, match="first training batch"):
        sae.training_forward_pass(step_input(x[:256]))
    assert sae.input_scale > 0
    with pytest.raises(ValueError, match="standardize_input=True"):
        make_training_sae().set_input_standardization(torch.zeros(12), 1.0)


def test_per_level_losses_and_metrics_reach_the_saelens_log():
    data = sparse_data(512, d=12, n_features=24)
    sae = make_training_sae(d_in=12, d_sae=64)
    cfg = SAETrainerConfig(total_training_samples=256, train_batch_size_samples=128, lr=1e-3, lr_end=1e-3)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(data, 128))
    out = sae.training_forward_pass(step_input(data[:128], logging=True))
    log = trainer.build_train_step_log_dict(out, n_training_samples=128)
    for k in sae.cfg.k_levels:
        assert f"losses/mse_loss_k{k}" in log and f"metrics/fvu_k{k}" in log
    assert log["losses/overall_loss"] == pytest.approx(out.loss.item())
    assert log["metrics/fvu_k2"] >= log["metrics/fvu_k64"]
    # only the weighted objective is optimised: the per-level entries are detached copies
    assert all(not v.requires_grad for v in out.losses.values())


# ------------------------------------------------------------------------------------------------------------
# saving, loading, folding
# ------------------------------------------------------------------------------------------------------------


def test_save_load_inference_and_training_checkpoints(tmp_path):
    data = sparse_data(1200, d=16, n_features=32)
    sae = make_training_sae(d_in=16, d_sae=64, k_levels=[2, 8, 64], standardize_input=True, inference_k=8)
    sae.fit_input_standardization([data])
    trainer = train(
        sae, data, steps=8, batch_size=100, checkpoint_path=str(tmp_path / "ckpt"), n_checkpoints=1
    )
    assert trainer.n_training_steps == 8
    sae.set_decoder_norm_to_unit_norm()
    x = data[:50]

    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert isinstance(loaded, MatryoshkaTopKSAE)
    assert loaded.cfg.k_levels == [2, 8, 64] and loaded.cfg.inference_k == 8 and loaded.cfg.standardize_input
    assert torch.equal(loaded.input_mean, sae.input_mean) and torch.equal(loaded.input_scale, sae.input_scale)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
        for k in (2, 8, None):
            assert torch.allclose(
                loaded.reconstructions(x, [k])[k], sae.reconstructions(x, [k])[k], atol=1e-5
            )

    checkpoints = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    assert checkpoints
    resumed = TrainingSAE.load_from_disk(checkpoints[0])
    assert isinstance(resumed, MatryoshkaTopKTrainingSAE)
    assert resumed.cfg.level_weighting == sae.cfg.level_weighting
    assert torch.allclose(resumed.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6)
    out = resumed.training_forward_pass(step_input(x))
    assert torch.isfinite(out.loss)

    sae.save_model(tmp_path / "final")
    final = TrainingSAE.load_from_disk(tmp_path / "final")
    with torch.no_grad():
        assert torch.allclose(
            final.training_forward_pass(step_input(x)).loss,
            sae.training_forward_pass(step_input(x)).loss,
            rtol=1e-5,
        )


def outputs_at_several_k(sae, x, ks=(3, 10, None)):
    with torch.no_grad():
        return [sae.decode(sae.encode(x, k=k)) for k in ks] + list(sae.reconstructions(x, list(ks)).values())


@pytest.mark.parametrize("standardize", [False, True])
def test_folding_keeps_the_function(standardize):
    torch.manual_seed(0)
    cfg = MatryoshkaTopKSAEConfig(d_in=10, d_sae=40, k_levels=[3, 10, 40], standardize_input=standardize)
    sae = MatryoshkaTopKSAE(cfg)
    randomize(sae)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) * 3 + 0.2)  # non-unit decoder rows
    if standardize:
        sae.set_input_standardization(torch.randn(10), 0.6)
    x = torch.randn(30, 10)
    before = outputs_at_several_k(sae, x)
    sae.fold_W_dec_norm()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(40), atol=1e-5)
    for a, b in zip(before, outputs_at_several_k(sae, x)):
        assert torch.allclose(a, b, atol=1e-4)

    c = 2.5  # trained on c * x: the folded SAE must take raw x and return raw reconstructions
    scaled = outputs_at_several_k(sae, c * x)
    sae.cfg.normalize_activations = "expected_average_only_in"
    sae.fold_activation_norm_scaling_factor(c)
    assert sae.cfg.normalize_activations == "none"
    for a, b in zip(scaled, outputs_at_several_k(sae, x)):
        assert torch.allclose(a / c, b, atol=1e-4)


@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_training_class_folding_keeps_the_function(normalize_decoder):
    sae = make_training_sae(d_in=10, d_sae=40, k_levels=[3, 10, 40], normalize_decoder=normalize_decoder)
    randomize(sae)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) * 3 + 0.2)
    x = torch.randn(30, 10)
    before = outputs_at_several_k(sae, x)
    sae.fold_W_dec_norm()
    for a, b in zip(before, outputs_at_several_k(sae, x)):
        assert torch.allclose(a, b, atol=1e-4)
    c = 0.4
    scaled = outputs_at_several_k(sae, c * x)
    sae.fold_activation_norm_scaling_factor(c)
    for a, b in zip(scaled, outputs_at_several_k(sae, x)):
        assert torch.allclose(a / c, b, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# registration, SAELens runner and command line
# ------------------------------------------------------------------------------------------------------------


def test_registered_idempotently_and_distinct_from_saelens_matryoshka():
    assert SAE_CLASS_REGISTRY["matryoshka_topk"] == (MatryoshkaTopKSAE, MatryoshkaTopKSAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["matryoshka_topk"] == (
        MatryoshkaTopKTrainingSAE,
        MatryoshkaTopKTrainingSAEConfig,
    )
    assert "matryoshka_topk" in register_architectures()
    assert "matryoshka_topk" in sae_vision_ext.register_architectures()  # a second call does not raise
    assert SAE_TRAINING_CLASS_REGISTRY["matryoshka_batchtopk"][0] is not MatryoshkaTopKTrainingSAE


def tiny_model_and_tokens(d_model=16, n_ctx=16, vocab=50, n_rows=64):
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=d_model, n_ctx=n_ctx, d_head=4, n_heads=4, d_vocab=vocab, act_fn="relu"
        )
    )
    tokens = torch.randint(0, vocab, (n_rows, n_ctx), generator=torch.Generator().manual_seed(0))
    return model, Dataset.from_dict({"tokens": tokens.tolist()}), tokens


def test_trains_inside_saelens_language_model_runner(tmp_path):
    model, dataset, tokens = tiny_model_and_tokens()
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaTopKTrainingSAEConfig(
            d_in=16, d_sae=64, k_levels=[4, 16, 64], level_weighting="reverse"
        ),
        model_name="tiny-random",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=16,
        training_tokens=16 * 128,
        train_batch_size_tokens=128,
        store_batch_size_prompts=4,
        n_batches_in_buffer=16,
        lr=1e-3,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=str(tmp_path / "out"),
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    assert isinstance(runner.sae, MatryoshkaTopKTrainingSAE)
    trained = runner.run()
    assert isinstance(trained, MatryoshkaTopKTrainingSAE)
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert isinstance(loaded, MatryoshkaTopKSAE)
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(tokens[:2])
    acts = cache["blocks.0.hook_resid_post"]
    assert loaded(acts).shape == acts.shape  # [batch, pos, d_in] works at inference


def test_saelens_command_line_lists_and_accepts_the_architecture(capsys):
    cfg = _parse_cfg_args(
        [
            "--architecture",
            "matryoshka_topk",
            "--d_in",
            "16",
            "--d_sae",
            "64",
            "--k_levels",
            "4",
            "16",
            "64",
            "--level_weighting",
            "reverse",
            "--reconstruction_loss",
            "nmse",
            "--model_name",
            "tiny",
            "--dataset_path",
            "none",
        ]
    )
    assert isinstance(cfg.sae, MatryoshkaTopKTrainingSAEConfig)
    assert cfg.sae.k_levels == [4, 16, 64] and cfg.sae.level_weighting == "reverse"
    assert cfg.sae.reconstruction_loss == "nmse"
    explicit = _parse_cfg_args(
        ["--architecture", "matryoshka_topk", "--level_weighting", "1,2,3", "--k_levels", "8", "64", "1024"]
    )
    assert explicit.sae.level_weighting == [1.0, 2.0, 3.0]
    with pytest.raises(SystemExit):
        _parse_cfg_args(["--help"])
    assert "matryoshka_topk" in capsys.readouterr().out


def test_math_of_reverse_weights_in_docstring():
    h = 8
    weights = level_weights("reverse", h)
    assert weights[0] == pytest.approx(h / (h * (h + 1) / 2))
    assert math.isclose(sum(weights), 1.0)
