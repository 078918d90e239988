"""overcomplete checkpoints, including the RA-SAE DINOv2 release layout, against overcomplete's forward pass.

A stand-in ``overcomplete`` package (same module paths, class names, attributes and eval-mode forward
as the toolbox) is written to a temp dir, used to pickle checkpoints exactly as the release does
(``torch.save(DataParallel(BatchTopKSAE))``), then removed from ``sys.modules`` before loading.
"""

import json
import sys
import textwrap

import pytest
import torch

from sae_vision_ext.loading import register_releases
from sae_vision_ext.loading.convert import convert_file
from sae_vision_ext.loading.hub_cache import seed_hf_cache
from sae_vision_ext.loading.overcomplete import OvercompleteSAE, overcomplete_huggingface_loader

REPO, FILE = "matybohacek/RA-SAE-DINOv2-32k", "RA-SAE-DINOv2-32k.pth"
D_IN, D_SAE, N_CAND = 12, 40, 50
register_releases()  # also done by ``import sae_vision_ext``; idempotent

FAKE_OVERCOMPLETE = {
    "overcomplete/__init__.py": "",
    "overcomplete/sae/__init__.py": "",
    "overcomplete/sae/modules.py": """
        import torch
        from torch import nn

        class MLPEncoder(nn.Module):
            def __init__(self, input_shape, n_components, norm_layer=nn.LayerNorm):
                super().__init__()
                self.input_size, self.n_components, self.hidden_dim = input_shape, n_components, input_shape
                self.nb_blocks, self.residual = 1, True
                self.norm_layer, self.hidden_activation, self.output_activation = norm_layer, nn.ReLU, nn.ReLU
                self.mlp_blocks = nn.ModuleList()
                self.final_block = nn.Sequential(nn.Linear(input_shape, n_components), norm_layer(n_components))
                self.final_activation = nn.ReLU()

            def forward(self, x):
                pre = self.final_block(x)
                return pre, self.final_activation(pre)
    """,
    "overcomplete/sae/archetypal_dictionary.py": """
        import torch
        from torch import nn

        class RelaxedArchetypalDictionary(nn.Module):
            def __init__(self, in_dimensions, nb_concepts, points, delta=1.0):
                super().__init__()
                self.in_dimensions, self.nb_concepts, self.delta, self.device = in_dimensions, nb_concepts, delta, "cuda"
                self.register_buffer("C", points)
                self.nb_candidates = points.shape[0]
                self.W = nn.Parameter(torch.eye(nb_concepts, self.nb_candidates))
                self.Relax = nn.Parameter(torch.zeros(nb_concepts, in_dimensions))
                self.multiplier = nn.Parameter(torch.tensor(0.0))
                self._fused_dictionary = None

            def get_dictionary(self):
                if self.training:
                    with torch.no_grad():
                        W = torch.relu(self.W)
                        W /= W.sum(dim=-1, keepdim=True) + 1e-8
                        self.W.data = W
                        scale = torch.clamp(self.delta / self.Relax.norm(dim=-1, keepdim=True), max=1)
                        self.Relax.data *= scale
                    return (self.W @ self.C + self.Relax) * torch.exp(self.multiplier)
                return self._fused_dictionary

            def forward(self, z):
                return z @ self.get_dictionary()

            def train(self, mode=True):
                if not mode:
                    self._fused_dictionary = self.get_dictionary()
                return super().train(mode)
    """,
    "overcomplete/sae/batchtopk_sae.py": """
        import torch
        from torch import nn

        class BatchTopKSAE(nn.Module):
            def __init__(self, encoder, dictionary, top_k):
                super().__init__()
                self.encoder, self.dictionary = encoder, dictionary
                self.top_k, self.threshold_momentum, self.running_threshold = top_k, 0.9, None
                self.nb_concepts, self.device = dictionary.nb_concepts, "cuda"

            def encode(self, x):
                pre, codes = self.encoder(x)
                return pre, codes * (codes >= self.running_threshold).float()

            def forward(self, x):
                pre, z = self.encode(x)
                return pre, z, self.dictionary(z)
    """,
    "overcomplete/sae/ra_sae.py": """
        import torch
        from torch import nn

        class RATopKSAE(nn.Module):
            def __init__(self, encoder, dictionary, top_k):
                super().__init__()
                self.encoder, self.dictionary, self.top_k = encoder, dictionary, top_k

            def encode(self, x):
                pre, codes = self.encoder(x)
                top = torch.topk(codes, self.top_k, dim=-1)
                return pre, torch.zeros_like(codes).scatter(-1, top.indices, top.values)

            def forward(self, x):
                pre, z = self.encode(x)
                return pre, z, self.dictionary(z)
    """,
}




@pytest.fixture
def overcomplete_pkg(tmp_path):
    """Import the stand-in package for the duration of the test; leave no trace in sys.modules."""
    root = tmp_path / "pkg"
    for rel, src in FAKE_OVERCOMPLETE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(src))
    sys.path.insert(0, str(root))
    from overcomplete.sae import archetypal_dictionary, batchtopk_sae, modules, ra_sae

    yield modules, archetypal_dictionary, batchtopk_sae, ra_sae
    sys.path.remove(str(root))
    for name in [n for n in sys.modules if n.split(".")[0] == "overcomplete"]:
        del sys.modules[name]


def _random_ra_dictionary(archetypal_dictionary, delta=1.0):
    torch.manual_seed(0)
    dictionary = archetypal_dictionary.RelaxedArchetypalDictionary(
        D_IN, D_SAE, torch.randn(N_CAND, D_IN), delta
    )
    with torch.no_grad():  # a trained state: W not yet re-projected, some Relax rows longer than delta
        dictionary.W.copy_(torch.randn(D_SAE, N_CAND))
        dictionary.Relax.copy_(torch.randn(D_SAE, D_IN) * 0.6)
        dictionary.multiplier.fill_(0.3)
    return dictionary


def _perturb_norm(norm):
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.1 * torch.randn_like(norm.bias))
        if hasattr(norm, "running_mean"):
            norm.running_mean.copy_(0.2 * torch.randn_like(norm.running_mean))
            norm.running_var.copy_(0.5 + torch.rand_like(norm.running_var))


def make_release_files(overcomplete_pkg, tmp_path):
    """Files in the published layout: a pickled DataParallel(BatchTopKSAE) + config.json; and the reference."""
    modules, archetypal_dictionary, batchtopk_sae, _ = overcomplete_pkg
    encoder = modules.MLPEncoder(D_IN, D_SAE)
    _perturb_norm(encoder.final_block[1])
    sae = batchtopk_sae.BatchTopKSAE(encoder, _random_ra_dictionary(archetypal_dictionary), top_k=5)
    wrapped = torch.nn.DataParallel(sae)
    wrapped.device_ids, wrapped.output_device, wrapped.src_device_obj = [0, 1], 0, torch.device("cuda", 0)
    path = tmp_path / FILE
    torch.save(wrapped, path)  # running_threshold None, dictionary not fused: as published

    x = torch.randn(64, D_IN)
    with torch.no_grad():
        _, codes = sae.encoder(x)
        threshold = codes.quantile(0.8).item()
        sae.running_threshold = threshold
        sae.eval()
        _, z_ref, x_hat_ref = sae(x)
    config = json.dumps({"running_threshold": threshold, "nb_concepts": D_SAE}).encode()
    return {FILE: path, "config.json": config}, x, z_ref, x_hat_ref


def test_release_by_name_matches_overcomplete_eval_forward(overcomplete_pkg, tmp_path, hf_cache):
    files, x, z_ref, x_hat_ref = make_release_files(overcomplete_pkg, tmp_path)
    seed_hf_cache(REPO, files)
    for name in [n for n in sys.modules if n.split(".")[0] == "overcomplete"]:
        del sys.modules[name]  # the loader must not need the package

    from sae_lens import SAE

    sae = SAE.from_pretrained("ra-sae-dinov2-vitb14-reg-32k", "32k")
    assert not [n for n in sys.modules if n.split(".")[0] == "overcomplete"]
    assert isinstance(sae, OvercompleteSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.sparsity) == (D_IN, D_SAE, "threshold")
    assert sae.cfg.encoder_norm == "layer_norm"
    meta = sae.cfg.metadata
    assert meta.model_name == "timm:vit_base_patch14_reg4_dinov2.lvd142m"
    assert meta.hook_name == "blocks.11.hook_resid_post" and meta.modality == "vision"
    assert meta.source_class == "overcomplete.sae.batchtopk_sae.BatchTopKSAE"
    with torch.no_grad():
        z = sae.encode(x)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
        assert 0 < (z > 0).float().mean() < 0.5
        torch.testing.assert_close(sae.decode(z), x_hat_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="fold"):  # LayerNorm encoder + global threshold: inexact
        sae.fold_W_dec_norm()


def test_repo_id_with_converter_and_saved_folder_roundtrip(overcomplete_pkg, tmp_path, hf_cache):
    files, x, z_ref, x_hat_ref = make_release_files(overcomplete_pkg, tmp_path)
    seed_hf_cache(REPO, files)
    from sae_lens import SAE

    with pytest.warns(UserWarning, match="ra-sae-dinov2-vitb14-reg-32k"):  # SAELens points to the release
        sae = SAE.from_pretrained(REPO, FILE, converter=overcomplete_huggingface_loader)
    sae.save_model(tmp_path / "converted")
    again = SAE.load_from_disk(tmp_path / "converted")
    assert again.cfg.threshold == pytest.approx(sae.cfg.threshold)
    assert again.cfg.metadata.model_name == "timm:vit_base_patch14_reg4_dinov2.lvd142m"
    with torch.no_grad():
        torch.testing.assert_close(again(x), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_release_without_threshold_fails_clearly(overcomplete_pkg, tmp_path, hf_cache):
    files, *_ = make_release_files(overcomplete_pkg, tmp_path)
    seed_hf_cache(REPO, {FILE: files[FILE]})  # no config.json
    from sae_lens import SAE

    with pytest.raises(ValueError, match="running threshold"):
        SAE.from_pretrained("ra-sae-dinov2-vitb14-reg-32k", "32k")


def test_state_dict_topk_with_batchnorm_encoder(overcomplete_pkg, tmp_path):
    """A ``torch.save(model.state_dict())`` of an RATopKSAE whose encoder norm is BatchNorm1d (folded)."""
    modules, archetypal_dictionary, _, ra_sae = overcomplete_pkg
    encoder = modules.MLPEncoder(D_IN, D_SAE, norm_layer=torch.nn.BatchNorm1d)
    _perturb_norm(encoder.final_block[1])
    sae = ra_sae.RATopKSAE(encoder, _random_ra_dictionary(archetypal_dictionary, delta=0.5), top_k=4)
    torch.save(sae.state_dict(), tmp_path / "ra_topk.pt")
    x = torch.randn(32, D_IN)
    sae.eval()
    with torch.no_grad():
        _, z_ref, x_hat_ref = sae(x)

    with pytest.raises(ValueError, match="sparsity"):
        convert_file(tmp_path / "ra_topk.pt", "overcomplete")
    converted = convert_file(tmp_path / "ra_topk.pt", "overcomplete", sparsity="topk", k=4, delta=0.5)
    assert converted.cfg.encoder_norm == "none"  # BatchNorm folded into the Linear layer
    with torch.no_grad():
        torch.testing.assert_close(converted.encode(x), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(converted(x), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_unsupported_layouts_fail_clearly(tmp_path):
    sd = {
        "encoder.final_block.0.weight": torch.zeros(4, 3),
        "encoder.mlp_blocks.0.0.weight": torch.zeros(3, 3),
    }
    torch.save(sd, tmp_path / "deep.pt")
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
