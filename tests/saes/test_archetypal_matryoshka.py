"""The archetypal dictionary on the plugin's Matryoshka (nested TopK) SAE: ``archetypal_matryoshka_topk``."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_class
from test_archetypal import assert_constraints, batches, make_candidates, trainer_for

import sae_vision_ext  # noqa: F401
from sae_vision_ext.saes import archetypal

D_IN, D_SAE = 12, 24


def make(**kw):
    kw.setdefault("k_levels", [2, 4, D_SAE])
    cfg = archetypal.ArchetypalMatryoshkaTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)
    return archetypal.ArchetypalMatryoshkaTopKTrainingSAE(cfg, candidates=make_candidates())


def test_registered_and_identity_init():
    assert get_sae_class("archetypal_matryoshka_topk")[0] is archetypal.ArchetypalMatryoshkaTopKSAE
    assert torch.equal(make().W_dec, make_candidates()[:D_SAE])


def test_trains_with_constraints_and_one_dictionary_per_step(tmp_path):
    sae = make(delta=0.3)
    trainer = trainer_for(sae, 6, lr=0.05)
    for x in batches(6):
        before = sae.archetypal.n_computations
        out = trainer.step(x)
        assert torch.isfinite(out.loss)
        assert sae.archetypal.n_computations - before == 1  # two W_dec reads per pass (atoms + norms)
        assert_constraints(sae.archetypal)
    sae.eval()
    x = next(batches(1, seed=7))
    with torch.no_grad():
        y, y4 = sae(x), sae.encode(x, k=4)
        # inference checkpoint and plain Matryoshka export give the same function at every k
        sae.save_inference_model(tmp_path / "inf")
        inf = SAE.load_from_disk(tmp_path / "inf")
        assert isinstance(inf, archetypal.ArchetypalMatryoshkaTopKSAE)
        sae.save_plain_model(tmp_path / "plain")
        plain = SAE.load_from_disk(tmp_path / "plain")
        assert plain.cfg.architecture() == "matryoshka_topk" and "W_dec" in plain.state_dict()
        for model in (inf, plain):
            assert torch.equal(model(x), y)
            assert torch.equal(model.encode(x, k=4), y4)
        # folding the atom norms keeps the function at every k (TopK ranks by z_i ||D_i||)
        before = {k: inf(x, k=k) for k in (2, 4, None)}
        inf.fold_W_dec_norm()
        for k, v in before.items():
            torch.testing.assert_close(inf(x, k=k), v, rtol=1e-5, atol=1e-5)


def test_rejects_decoder_renormalisation_and_input_standardisation():
    with pytest.raises(ValueError, match="normalize_decoder=False"):
        make(normalize_decoder=True)
    with pytest.raises(ValueError, match="standardize_input"):
        make(standardize_input=True)
    with pytest.raises(NotImplementedError):
        make().set_decoder_norm_to_unit_norm()
