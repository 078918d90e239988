"""Archetypal dictionary, RA-SAE and A-SAE: constraints, caching, folds, export, errors."""

import inspect
import json
import subprocess
import sys
import warnings

import pytest
import torch
from sae_lens import SAE, LoggingConfig, TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file
from torch.optim import optimizer as optimizer_module

import sae_vision_ext  # noqa: F401  (registers the architectures)
from sae_vision_ext.saes.archetypal import (
    ARCHITECTURES,
    ASAE,
    RASAE,
    ArchetypalDecoderMixin,
    ArchetypalDictionary,
    ArchetypalMatryoshkaTopKTrainingSAE,
    ASAETrainingSAE,
    ASAETrainingSAEConfig,
    RASAETrainingSAE,
    RASAETrainingSAEConfig,
    init_decoder_from_candidates,
)
from sae_vision_ext.saes.candidates_file import Candidates

D_IN, D_SAE, N_CAND, K = 12, 24, 40, 4


def make_candidates(n=N_CAND, d=D_IN, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def make_sae(cls=RASAETrainingSAE, cfg_cls=RASAETrainingSAEConfig, candidates=None, **kw):
    kw.setdefault("k", K)
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw)
    return cls(cfg, candidates=make_candidates() if candidates is None else candidates)


def batches(n_batches, batch=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield torch.randn(batch, D_IN, generator=g) * 2 + 1


def trainer_for(sae, n_steps, lr=3e-2, batch=32):
    cfg = SAETrainerConfig(
        total_training_samples=n_steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    return SAETrainer(cfg, sae, batches(n_steps, batch))


def assert_feasible(W: torch.Tensor, Lambda: torch.Tensor | None, delta: float):
    assert W.min() >= 0
    torch.testing.assert_close(W.sum(dim=1), torch.ones(W.shape[0], dtype=W.dtype), atol=1e-5, rtol=0)
    if Lambda is not None:
        assert (Lambda.norm(dim=1) <= delta * (1 + 1e-5)).all()


def assert_constraints(dictionary: ArchetypalDictionary):
    """The weights as saved (``state_dict``) satisfy the constraints."""
    state = dictionary.state_dict()
    assert_feasible(state["W"], state.get("Lambda"), dictionary.delta)


def test_registered_under_both_names():
    names = [a[0] for a in ARCHITECTURES]
    assert names[:2] == ["ra_sae", "a_sae"]
    assert get_sae_class("ra_sae")[0] is RASAE and get_sae_class("a_sae")[0] is ASAE
    assert get_sae_training_class("ra_sae")[0] is RASAETrainingSAE
    assert get_sae_training_class("a_sae")[0] is ASAETrainingSAE


def test_identity_init_gives_first_candidates():
    C = make_candidates()
    sae = make_sae(candidates=C)
    assert torch.equal(sae.W_dec, C[:D_SAE])
    assert sae.cfg.n_candidates == N_CAND
    assert "W_dec" not in sae.state_dict()
    assert_constraints(sae.archetypal)


def test_W_dec_is_an_explicit_read_only_property():
    """``W_dec`` is a class-level property (no ``__getattr__`` magic), read-only, and no parameter."""
    for cls in (RASAE, RASAETrainingSAE, ArchetypalMatryoshkaTopKTrainingSAE):
        assert isinstance(inspect.getattr_static(cls, "W_dec"), property)
        assert "__getattr__" not in vars(ArchetypalDecoderMixin)
    sae = make_sae()
    assert "W_dec" not in dict(sae.named_parameters())
    with pytest.raises(AttributeError):
        sae.W_dec = torch.zeros(D_SAE, D_IN)


def test_more_atoms_than_candidates_warns_and_starts_at_zero():
    C = make_candidates(n=10)
    with pytest.warns(UserWarning, match="exceeds the number of candidates"):
        sae = make_sae(candidates=C)
    assert torch.equal(sae.W_dec[:10], C)
    assert torch.count_nonzero(sae.W_dec[10:]) == 0


def test_random_candidates_init_is_seeded():
    C = make_candidates()
    a = make_sae(candidates=C, dictionary_init="random_candidates", dictionary_init_seed=3).W_dec
    b = make_sae(candidates=C, dictionary_init="random_candidates", dictionary_init_seed=3).W_dec
    c = make_sae(candidates=C, dictionary_init="random_candidates", dictionary_init_seed=4).W_dec
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every atom is a distinct candidate
    same = (a.detach()[:, None, :] == C[None]).all(dim=-1)  # [d_sae, n']
    assert torch.all(same.sum(dim=1) == 1)
    assert same.float().argmax(dim=1).unique().numel() == D_SAE


@pytest.mark.parametrize("delta", [0.3, 0.0])
def test_constraints_hold_after_every_optimizer_step(delta):
    sae = make_sae(delta=delta, learn_dictionary_scale=True)
    trainer = trainer_for(sae, 12, lr=0.2)  # large steps push W negative and Lambda far out
    for batch in batches(12):
        trainer.step(batch)
        assert_constraints(sae.archetypal)
    assert (sae.archetypal.W.detach().max(dim=1).values < 1).any()  # atoms did move off the vertices
    if delta > 0:
        norms = sae.archetypal.Lambda.detach().norm(dim=1)
        assert torch.isclose(norms.max(), torch.tensor(delta), rtol=1e-4)  # the bound was active


def test_constraints_hold_with_any_torch_optimizer():
    sae = make_sae(delta=0.1)
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    for x in batches(3):
        out = sae.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        assert_constraints(sae.archetypal)


def test_trainer_optimizer_is_left_as_built():
    """SAETrainer's Adam keeps the kernel it was built with, and its updates equal a hand-written loop with
    the same Adam, clipping and projection: the dictionary changes nobody's optimizer."""
    torch.manual_seed(0)
    sae = make_sae(delta=0.3)
    mine = make_sae(delta=0.3)
    mine.load_state_dict(sae.state_dict())
    trainer = trainer_for(sae, 3)
    own = torch.optim.Adam(mine.parameters(), lr=3e-2)
    for x in batches(3):
        trainer.step(x)
        out = mine.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(mine.parameters(), 1.0)
        own.step()
        own.zero_grad()
    for optimizer in (trainer.optimizer, own):
        assert [(g["fused"], g["foreach"]) for g in optimizer.param_groups] == [(None, None)]
    for name, value in sae.state_dict().items():
        assert torch.equal(value, mine.state_dict()[name]), name


def test_projection_is_scoped_to_the_dictionary():
    """Building and training archetypal SAEs installs no process-wide optimizer hook: an unrelated model's
    optimizer steps exactly as it would without them: weights unprojected, kernel flags unchanged."""

    def global_hooks_of_this_package():
        hooks = [
            *optimizer_module._global_optimizer_pre_hooks.values(),
            *optimizer_module._global_optimizer_post_hooks.values(),
        ]
        return [h for h in hooks if getattr(h, "__module__", "").startswith("sae_vision_ext")]

    def unrelated_model():
        torch.manual_seed(3)
        model = torch.nn.Linear(6, 5)
        with torch.no_grad():
            model.weight.sub_(1.0)  # far from row-stochastic: a projection would show
        return model

    def adam_steps(model, n=3):
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        for i in range(n):
            model(torch.full((4, 6), float(i + 1))).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return opt

    alone = unrelated_model()
    adam_steps(alone)  # no archetypal SAE trained yet

    sae = make_sae(delta=0.3)
    trainer = trainer_for(sae, 3, lr=0.2)
    for x in batches(3):
        trainer.step(x)
    beside = unrelated_model()
    opt = adam_steps(beside)  # the same steps, after (and next to) a trained archetypal SAE
    assert global_hooks_of_this_package() == []
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, None)]
    assert torch.equal(beside.weight, alone.weight) and torch.equal(beside.bias, alone.bias)
    assert beside.weight.min() < 0  # not projected
    assert_constraints(sae.archetypal)  # while the SAE's own dictionary is


def test_sae_trainer_keeps_constraints_in_steps_and_saved_files(tmp_path):
    """Through SAELens's SAETrainer: after every step the weights as saved (state_dict and the file
    ``save_model`` writes) are feasible, the next training forward uses projected parameters, and saving
    does not perturb training (one projection per step either way)."""
    delta = 0.3
    sae, twin = make_sae(delta=delta), make_sae(delta=delta)
    twin.load_state_dict(sae.state_dict())
    trainer, twin_trainer = trainer_for(sae, 6, lr=0.2), trainer_for(twin, 6, lr=0.2)
    for i, x in enumerate(batches(6)):
        trainer.step(x)
        twin_trainer.step(x)
        violation = sae.archetypal.constraint_violation()  # the raw parameters right after the step
        assert violation["W_min"] < 0 or violation["Lambda_excess"] > 0  # the step left the sets
        weights, _ = sae.save_model(tmp_path / f"step{i}")
        saved = load_file(weights)
        assert_feasible(saved["archetypal.W"], saved["archetypal.Lambda"], delta)
        assert_constraints(sae.archetypal)
    for name, value in sae.state_dict().items():  # the twin never saved: same trajectory, bit for bit
        assert torch.equal(value, twin.state_dict()[name]), name
    twin_violation = twin.archetypal.constraint_violation()
    assert twin_violation["W_min"] < 0 or twin_violation["Lambda_excess"] > 0
    twin.training_forward_pass(TrainStepInput(next(batches(1, seed=8)), {}, None, 0, False))
    assert_feasible(twin.archetypal.W.detach(), twin.archetypal.Lambda.detach(), delta)  # projected first


def test_fused_adam_steps_are_projected_too():
    """PyTorch's fused Adam writes W without moving its version counter; the forward pass that preceded the
    step tells the dictionary to project before the next use anyway."""
    sae = make_sae(delta=0.2)
    opt = torch.optim.Adam(sae.parameters(), lr=0.2, fused=True)
    for x in batches(4):
        out = sae.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        sae.eval()
        with torch.no_grad():
            torch.testing.assert_close(sae.W_dec, sae.archetypal.compute(), rtol=0, atol=0)
        assert_feasible(sae.archetypal.W.detach(), sae.archetypal.Lambda.detach(), 0.2)
        sae.train()
    assert (sae.archetypal.W.detach().max(dim=1).values < 1).any()  # it did train


def test_delta_zero_is_a_sae_and_trains_without_nan():
    for sae in (make_sae(delta=0.0), make_sae(cls=ASAETrainingSAE, cfg_cls=ASAETrainingSAEConfig)):
        assert sae.archetypal.Lambda is None and sae.cfg.delta == 0
        trainer = trainer_for(sae, 15, lr=0.1)
        trainer.n_forward_passes_since_fired[: D_SAE // 2] = 10**6  # aux loss active
        for batch in batches(15):
            out = trainer.step(batch)
            assert torch.isfinite(out.loss)
        assert torch.isfinite(sae.W_dec).all()
        assert_constraints(sae.archetypal)
        # D stays in the convex hull: each atom is a convex combination of the candidates
        C = sae.archetypal.C
        torch.testing.assert_close(sae.W_dec, sae.archetypal.W.detach() @ C)


@pytest.mark.parametrize("rescale", [False, True])
def test_dictionary_computed_once_per_training_step(rescale):
    sae = make_sae(rescale_acts_by_decoder_norm=rescale)
    trainer = trainer_for(sae, 4)
    for batch in batches(4):
        trainer.n_forward_passes_since_fired[:] = 10**6  # every latent "dead": the aux loss reads W_dec too
        before = sae.archetypal.n_computations
        out = trainer.step(batch)
        assert out.losses["auxiliary_reconstruction_loss"] > 0
        assert sae.archetypal.n_computations - before == 1


def test_gradient_reaches_mixing_weights_and_relaxation():
    sae = make_sae(delta=0.5)
    out = sae.training_forward_pass(TrainStepInput(next(batches(1)), {}, None, 0, False))
    out.loss.backward()
    assert sae.archetypal.W.grad is not None and sae.archetypal.W.grad.abs().sum() > 0
    assert sae.archetypal.Lambda.grad.abs().sum() > 0
    assert sae.archetypal.C.grad is None  # candidates are fixed


def test_inference_cache_is_reused_and_never_stale(tmp_path):
    sae = make_sae(delta=0.5)
    sae.eval()
    d0 = sae.W_dec
    n = sae.archetypal.n_computations
    assert sae.W_dec is d0 and sae.archetypal.n_computations == n  # reused

    def fresh():
        with torch.no_grad():
            return sae.archetypal.compute()

    # optimizer step
    trainer = trainer_for(sae, 1)
    trainer.step(next(batches(1)))
    sae.eval()
    assert not torch.equal(sae.W_dec, d0)
    torch.testing.assert_close(sae.W_dec, fresh(), rtol=0, atol=0)
    # load_state_dict (copy and assign)
    other = make_sae(delta=0.5, candidates=make_candidates(seed=5)).state_dict()
    sae.load_state_dict(other)
    torch.testing.assert_close(sae.W_dec, fresh(), rtol=0, atol=0)
    torch.testing.assert_close(sae.W_dec, other["archetypal.C"][:D_SAE], rtol=0, atol=0)
    sae.load_state_dict(make_sae(delta=0.5, candidates=make_candidates(seed=6)).state_dict(), assign=True)
    torch.testing.assert_close(sae.W_dec, fresh(), rtol=0, atol=0)
    # dtype / device move
    sae.to(torch.float64)
    assert sae.W_dec.dtype == torch.float64
    torch.testing.assert_close(sae.W_dec, fresh(), rtol=0, atol=0)
    # in-place parameter edits and folds
    with torch.no_grad():
        sae.archetypal.Lambda.add_(0.01)
    torch.testing.assert_close(sae.W_dec, fresh(), rtol=0, atol=0)
    sae.cfg.rescale_acts_by_decoder_norm = True
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))


def _trained(cls=RASAETrainingSAE, cfg_cls=RASAETrainingSAEConfig, steps=8, **kw):
    sae = make_sae(cls, cfg_cls, **kw)
    trainer = trainer_for(sae, steps)
    for batch in batches(steps):
        trainer.step(batch)
    return sae.eval()


def test_exported_topk_reproduces_outputs_exactly(tmp_path):
    x = next(batches(1, batch=64, seed=9))
    for rescale in (False, True):
        sae = _trained(delta=0.5, rescale_acts_by_decoder_norm=rescale, learn_dictionary_scale=True)
        with torch.no_grad():
            expected, z = sae(x), sae.encode(x)
        # full archetypal inference checkpoint
        sae.save_inference_model(tmp_path / f"ra{rescale}")
        loaded = SAE.load_from_disk(tmp_path / f"ra{rescale}")
        assert isinstance(loaded, RASAE)
        # ... which also holds everything needed to continue training
        resumed = make_sae(delta=0.5, rescale_acts_by_decoder_norm=rescale, learn_dictionary_scale=True)
        resumed.load_weights_from_checkpoint(tmp_path / f"ra{rescale}")
        assert torch.equal(resumed.eval().W_dec, sae.W_dec)
        # plain SAELens topk export
        sae.save_plain_model(tmp_path / f"topk{rescale}")
        cfg = json.loads((tmp_path / f"topk{rescale}" / "cfg.json").read_text())
        assert cfg["architecture"] == "topk" and cfg["rescale_acts_by_decoder_norm"] == rescale
        plain = SAE.load_from_disk(tmp_path / f"topk{rescale}")
        assert type(plain) is TopKSAE
        assert torch.equal(plain.W_dec, sae.W_dec)
        with torch.no_grad():
            for model in (loaded, plain, sae.to_plain_sae()):
                assert torch.equal(model(x), expected)
                assert torch.equal(model.encode(x), z)


@pytest.mark.slow  # a fresh interpreter importing sae_lens: ~10 s idle, much more on a busy box
def test_exported_topk_loads_without_the_plugin(tmp_path):
    sae = _trained(steps=3)
    sae.save_plain_model(tmp_path / "topk")
    x = next(batches(1, seed=4))
    with torch.no_grad():
        torch.save({"x": x, "y": sae(x)}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from sae_lens import SAE\n"
        f"sae = SAE.load_from_disk({str(tmp_path / 'topk')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "assert 'sae_vision_ext' not in sys.modules\n"
        "assert torch.equal(sae(io['x']), io['y'])\n"
        "print(type(sae).__name__)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("TopKSAE")


def test_training_checkpoint_round_trip_continues_training(tmp_path):
    sae = _trained(delta=0.5, learn_dictionary_scale=True)
    sae.save_model(tmp_path / "ck")
    again = TrainingSAE.load_from_disk(tmp_path / "ck")
    assert isinstance(again, RASAETrainingSAE)
    for k, v in sae.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    again.train()
    trainer = trainer_for(again, 2)
    for batch in batches(2):
        trainer.step(batch)
    assert_constraints(again.archetypal)
    # the full training checkpoint also loads into a freshly built training SAE (runner resume path)
    fresh = make_sae(delta=0.5, learn_dictionary_scale=True)
    fresh.load_weights_from_checkpoint(tmp_path / "ck")
    assert torch.equal(fresh.W_dec, sae.W_dec)


def test_fold_W_dec_norm_is_function_preserving():
    x = next(batches(1, batch=64, seed=3))
    for sae in (_trained(rescale_acts_by_decoder_norm=True, delta=0.5), _inference_copy()):
        with torch.no_grad():
            before = sae(x)
            sae.fold_W_dec_norm()
            after = sae(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="rescale_acts_by_decoder_norm"):
        _trained(steps=1).fold_W_dec_norm()


def _inference_copy():
    trained = _trained(rescale_acts_by_decoder_norm=True, steps=4)
    cfg = trained.cfg.get_inference_sae_cfg_dict()
    inf = SAE.from_dict(cfg)
    inf.load_state_dict(trained.state_dict())
    assert isinstance(inf, RASAE)
    return inf


@pytest.mark.parametrize("rescale", [False, True])
def test_fold_activation_norm_scaling_factor_is_function_preserving(rescale):
    sae = _trained(delta=0.5, rescale_acts_by_decoder_norm=rescale)
    x, s = next(batches(1, batch=64, seed=5)), 2.5
    with torch.no_grad():
        expected = sae(x * s) / s
        sae.fold_activation_norm_scaling_factor(s)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="whitening"):
        sae.fold_activation_whitening(torch.zeros(D_IN), torch.eye(D_IN), torch.eye(D_IN))


def test_topk_control_decoder_from_candidates():
    C = make_candidates()
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    control = TopKTrainingSAE(cfg)
    init_decoder_from_candidates(control, C, init="random_candidates", seed=3)
    ra = make_sae(candidates=C, dictionary_init="random_candidates", dictionary_init_seed=3)
    assert torch.equal(control.W_dec.detach(), ra.W_dec)
    with pytest.raises(TypeError):
        init_decoder_from_candidates(ra, C)


def test_config_reads_candidates_file(tmp_path):
    C = make_candidates()
    mean, std = torch.full((D_IN,), 1.0), torch.full((D_IN,), 2.0)
    Candidates(C, (C - mean) / std, mean, std, torch.ones(N_CAND, dtype=torch.int64)).save(
        tmp_path / "c.safetensors"
    )
    cfg = RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, candidates_path=str(tmp_path / "c.safetensors"))
    assert cfg.n_candidates == N_CAND
    assert torch.equal(RASAETrainingSAE(cfg).W_dec, C[:D_SAE])
    cfg_std = RASAETrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        candidates_path=str(tmp_path / "c.safetensors"),
        candidates_space="standardized",
    )
    torch.testing.assert_close(RASAETrainingSAE(cfg_std).W_dec, ((C - mean) / std)[:D_SAE])
    # a config round-trips through dicts (what SAELens's runner does)
    again = RASAETrainingSAEConfig.from_dict(cfg.to_dict())
    assert again.n_candidates == N_CAND and again.candidates_path == cfg.candidates_path


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="delta"):
        RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, delta=-0.1, n_candidates=5)
    with pytest.raises(ValueError, match="delta"):
        ArchetypalDictionary(D_SAE, D_IN, make_candidates(), delta=-1.0)
    with pytest.raises(ValueError, match="delta must be 0"):
        ASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, delta=0.5, n_candidates=5)
    bad = make_candidates()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make_sae(candidates=bad)
    with pytest.raises(ValueError, match="width 5 but the SAE's d_in is 12"):
        make_sae(candidates=torch.randn(30, 5))
    with pytest.raises(ValueError, match="zero candidates"):
        make_sae(candidates=torch.zeros(0, D_IN))
    with pytest.raises(ValueError, match="zero candidates"):
        RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_candidates=0)
    Candidates.from_points(torch.randn(20, 5)).save(tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="width 5 but the SAE's d_in is 12"):
        RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, candidates_path=str(tmp_path / "narrow.safetensors"))
    with pytest.raises(FileNotFoundError, match="sae-vision candidates"):
        RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, candidates_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="needs candidates"):
        RASAETrainingSAE(RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(ValueError, match="normalize_activations"):
        RASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_candidates=5, normalize_activations="layer_norm")


def test_no_warnings_when_loading(tmp_path):
    sae = _trained(steps=1)
    sae.save_model(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        TrainingSAE.load_from_disk(tmp_path / "ck")
