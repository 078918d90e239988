"""overcomplete checkpoints, including the RA-SAE DINOv2 release layout, against the real toolbox.

SAEs are built with ``overcomplete`` itself (a dev dependency), saved the way its users save them (the whole
module with ``torch.save``, as the release does with ``DataParallel(BatchTopKSAE)``, or its state dict), and
our loader must reproduce overcomplete's own eval-mode forward pass. The package is removed from
``sys.modules`` before loading: the loader must not need it.
"""

import json
import sys

import pytest
import torch
from helpers import forget_overcomplete, import_overcomplete_sae
from sae_lens import SAE

from sae_vision_ext.loading.convert import convert_file
from sae_vision_ext.loading.hub_cache import seed_hf_cache
from sae_vision_ext.loading.overcomplete import OvercompleteSAE, overcomplete_huggingface_loader
from sae_vision_ext.loading.registration import register_releases

REPO, FILE = "matybohacek/RA-SAE-DINOv2-32k", "RA-SAE-DINOv2-32k.pth"
D_IN, D_SAE, N_CAND = 12, 40, 50
register_releases()  # also done by ``import sae_vision_ext``; idempotent


@pytest.fixture
def oc():
    """The real ``overcomplete.sae`` module, imported for the test and forgotten afterwards."""
    yield import_overcomplete_sae()
    forget_overcomplete()


def _train_like(sae, delta=1.0):
    """Parameters as training leaves them: W not yet re-projected, some Relax rows longer than delta."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name.endswith(("norm.weight", "final_block.1.weight")):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
        dictionary = sae.dictionary
        if hasattr(dictionary, "Relax"):
            dictionary.W.copy_(torch.randn_like(dictionary.W))
            dictionary.Relax.copy_(torch.randn_like(dictionary.Relax) * 0.6 * delta)
        dictionary.multiplier.fill_(0.3)
        norm = sae.encoder.final_block[1]
        if isinstance(norm, torch.nn.BatchNorm1d):
            norm.running_mean.copy_(0.2 * torch.randn_like(norm.running_mean))
            norm.running_var.copy_(0.5 + torch.rand_like(norm.running_var))
    return sae


def _ra_batchtopk(oc):
    """The release's model: BatchTopKSAE with a LayerNorm encoder and a relaxed archetypal dictionary."""
    torch.manual_seed(0)
    sae = oc.BatchTopKSAE(D_IN, D_SAE, top_k=5, encoder_module="mlp_ln_1")
    sae.dictionary = oc.RelaxedArchetypalDictionary(D_IN, D_SAE, torch.randn(N_CAND, D_IN), delta=1.0)
    return _train_like(sae)


def _eval_forward(sae, x):
    sae.eval()  # overcomplete fuses the dictionary here (projecting W and Relax first)
    with torch.no_grad():
        _, z, x_hat = sae(x)
    return z, x_hat


def make_release_files(oc, tmp_path):
    """Files in the published layout (pickled DataParallel(BatchTopKSAE) + config.json), and the reference."""
    sae = _ra_batchtopk(oc)
    wrapped = torch.nn.DataParallel(sae)
    wrapped.device_ids, wrapped.output_device, wrapped.src_device_obj = [0, 1], 0, torch.device("cuda", 0)
    path = tmp_path / FILE
    torch.save(wrapped, path)  # running_threshold None, dictionary not fused: as published

    x = torch.randn(64, D_IN)
    with torch.no_grad():
        _, codes = sae.encoder(x)
    threshold = codes.quantile(0.8)
    sae.running_threshold = threshold
    z_ref, x_hat_ref = _eval_forward(sae, x)
    config = json.dumps({"running_threshold": threshold.item(), "nb_concepts": D_SAE}).encode()
    return {FILE: path, "config.json": config}, x, z_ref, x_hat_ref


def test_release_by_name_matches_overcomplete_eval_forward(oc, tmp_path, hf_cache):
    files, x, z_ref, x_hat_ref = make_release_files(oc, tmp_path)
    seed_hf_cache(REPO, files)
    forget_overcomplete()  # the loader must not need the package

    sae = SAE.from_pretrained("ra-sae-dinov2-vitb14-reg-32k", "32k")
    assert not [n for n in sys.modules if n.split(".")[0] == "overcomplete"]
    assert isinstance(sae, OvercompleteSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.sparsity) == (D_IN, D_SAE, "threshold")
    assert sae.cfg.encoder_norm == "layer_norm"
    meta = sae.cfg.metadata
    assert meta.model_name == "timm:vit_base_patch14_reg4_dinov2.lvd142m"
    assert meta.hook_name == "hook_normed" and meta.modality == "vision"
    assert meta.source_class == "overcomplete.sae.batchtopk_sae.BatchTopKSAE"
    with torch.no_grad():
        z = sae.encode(x)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
        assert 0 < (z > 0).float().mean() < 0.5
        torch.testing.assert_close(sae.decode(z), x_hat_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="fold"):  # LayerNorm encoder + global threshold: inexact
        sae.fold_W_dec_norm()


def test_repo_id_with_converter_and_saved_folder_roundtrip(oc, tmp_path, hf_cache):
    files, x, _, x_hat_ref = make_release_files(oc, tmp_path)
    seed_hf_cache(REPO, files)
    with pytest.warns(UserWarning, match="ra-sae-dinov2-vitb14-reg-32k"):  # SAELens points to the release
        sae = SAE.from_pretrained(REPO, FILE, converter=overcomplete_huggingface_loader)
    sae.save_model(tmp_path / "converted")
    again = SAE.load_from_disk(tmp_path / "converted")
    assert again.cfg.threshold == pytest.approx(sae.cfg.threshold)
    assert again.cfg.metadata.model_name == "timm:vit_base_patch14_reg4_dinov2.lvd142m"
    with torch.no_grad():
        torch.testing.assert_close(again(x), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_release_without_threshold_fails_clearly(oc, tmp_path, hf_cache):
    files, *_ = make_release_files(oc, tmp_path)
    seed_hf_cache(REPO, {FILE: files[FILE]})  # no config.json
    with pytest.raises(ValueError, match="running threshold"):
        SAE.from_pretrained("ra-sae-dinov2-vitb14-reg-32k", "32k")


@pytest.mark.parametrize("saved", ["module", "state_dict"])
def test_ra_topk_sae_with_batchnorm_encoder(oc, tmp_path, saved):
    """RATopKSAE (BatchNorm encoder, folded): ``torch.save(sae)`` says it all; a state dict needs options."""
    torch.manual_seed(0)
    sae = oc.RATopKSAE(D_IN, D_SAE, torch.randn(N_CAND, D_IN), top_k=4, delta=0.5, encoder_module="mlp_bn_1")
    _train_like(sae, delta=0.5)
    path = tmp_path / "ra_topk.pt"
    torch.save(sae if saved == "module" else sae.state_dict(), path)
    x = torch.randn(32, D_IN)
    z_ref, x_hat_ref = _eval_forward(sae, x)
    forget_overcomplete()

    if saved == "module":
        converted = convert_file(path)
        assert converted.cfg.metadata.source_class == "overcomplete.sae.rasae.RATopKSAE"
    else:
        with pytest.raises(ValueError, match="sparsity"):
            convert_file(path, "overcomplete")
        converted = convert_file(path, "overcomplete", sparsity="topk", k=4, delta=0.5)
    assert (converted.cfg.sparsity, converted.cfg.k) == ("topk", 4)
    assert converted.cfg.encoder_norm == "none"  # BatchNorm folded into the Linear layer
    with torch.no_grad():
        torch.testing.assert_close(converted.encode(x), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(converted(x), x_hat_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls_name, sparsity", [("TopKSAE", "topk"), ("SAE", "relu")])
def test_plain_dictionary_with_a_trained_multiplier(oc, tmp_path, cls_name, sparsity):
    """The default linear encoder and an l2-normalised dictionary scaled by exp(multiplier)."""
    torch.manual_seed(0)
    kwargs = {"top_k": 3} if cls_name == "TopKSAE" else {}
    sae = getattr(oc, cls_name)(D_IN, D_SAE, dictionary_params={"use_multiplier": True}, **kwargs)
    _train_like(sae)
    torch.save(sae, tmp_path / "sae.pt")
    x = torch.randn(16, D_IN)
    z_ref, x_hat_ref = _eval_forward(sae, x)
    forget_overcomplete()

    converted = convert_file(tmp_path / "sae.pt")
    assert converted.cfg.sparsity == sparsity and converted.cfg.encoder_norm == "none"
    with torch.no_grad():
        torch.testing.assert_close(converted.encode(x), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(converted(x), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_unsupported_layouts_fail_clearly(oc, tmp_path):
    torch.save(oc.TopKSAE(D_IN, D_SAE, encoder_module="mlp_ln_3").state_dict(), tmp_path / "deep.pt")
    with pytest.raises(ValueError, match="nb_blocks > 1"):
        convert_file(tmp_path / "deep.pt", "overcomplete", sparsity="relu")
    torch.save({"encoder.final_block.0.weight": torch.zeros(4, 3)}, tmp_path / "nodict.pt")
    with pytest.raises(ValueError, match="no dictionary found"):
        convert_file(tmp_path / "nodict.pt", "overcomplete", sparsity="relu")
    torch.save(
        {"encoder.final_block.0.weight": torch.zeros(4, 3), "dictionary._weights": torch.ones(5, 3)},
        tmp_path / "mismatch.pt",
    )
    with pytest.raises(ValueError, match=r"dictionary shape \(5, 3\) does not match the encoder's \(4, 3\)"):
        convert_file(tmp_path / "mismatch.pt", "overcomplete", sparsity="relu")
