import math

import pytest
import torch

from sae_vision_ext.evals.reconstruction import (
    cosine_similarity,
    dead_latents,
    evaluate_sae,
    explained_variance,
    fraction_zero,
    fvu,
    l0,
)

# Hand example: dataset mean row = [0.5, 1, 3]; total sum of squares = 2.5; squared errors 1 and 1.
X = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
X_HAT = torch.tensor([[1.0, 2.0, 2.0], [0.0, 1.0, 3.0]])


def test_fvu_over_dataset_hand_value():
    assert fvu(X, X_HAT) == pytest.approx(2.0 / 2.5)


def test_fvu_per_sample_centres_each_sample_on_its_own_mean():
    # row 1: mean 2, mean_d dev^2 = 2/3, mean_d err^2 = 1/3 -> 0.5 ; row 2: mean 1, dev^2 = 2, err 1/3 -> 1/6
    assert fvu(X, X_HAT, per_sample=True) == pytest.approx((0.5 + 1 / 6) / 2)


def test_fvu_per_sample_uncentred_is_openai_normalised_mse():
    # row 1: (1/3) / (14/3) ; row 2: (1/3) / 3
    assert fvu(X, X_HAT, per_sample=True, center="none") == pytest.approx((1 / 14 + 1 / 9) / 2)
    with pytest.raises(ValueError):
        fvu(X, X_HAT, per_sample=True, center="bogus")


def test_explained_variance_is_one_minus_fvu():
    assert explained_variance(X, X_HAT) == pytest.approx(1 - 0.8)
    assert explained_variance(X, X) == pytest.approx(1.0)


def test_cosine_similarity_hand_value():
    expected = (11 / (3 * math.sqrt(14)) + 3 / math.sqrt(10)) / 2
    assert cosine_similarity(X, X_HAT) == pytest.approx(expected)


def test_l0_and_fraction_zero():
    z = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert l0(z) == pytest.approx(1.0)  # (2 + 1 + 0) / 3
    assert fraction_zero(z) == pytest.approx(9 / 12)


def test_dead_latents_threshold_and_never_fired():
    counts = torch.tensor([0, 1, 5, 100])
    assert dead_latents(counts, 1000, threshold=0.004).tolist() == [True, True, False, False]
    assert dead_latents(counts, 1000, threshold=0.0).tolist() == [True, False, False, False]
    # default threshold 10^-5.5 ~ 3.16e-6 over a window of 10^6 rows: 3 fires dead, 4 alive
    assert dead_latents(torch.tensor([3, 4]), 10**6).tolist() == [True, False]
    with pytest.raises(ValueError):
        dead_latents(counts, 0)


class MaskSAE(torch.nn.Module):
    """z = x with the last coordinate dropped (plus a zero latent); decode pads back. No parameters
    learned."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.grad_was_enabled = []

    def encode(self, x, k=None):
        self.grad_was_enabled.append(torch.is_grad_enabled())
        z = torch.cat([x[:, :2] * self.scale, torch.zeros(x.shape[0], 2)], dim=1)
        if k is not None:
            z[:, k:] = 0
        return z

    def decode(self, z):
        return torch.cat([z[:, :2], torch.zeros(z.shape[0], 1)], dim=1)


def test_evaluate_sae_streams_hand_values_over_batches():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0]])
    sae = MaskSAE()
    # errors: 9, 9, 0 ; mean row [1, 1, 2] ; total SS = (0+1+1) + (1+1+1) + (1+0+4) = 10
    result = evaluate_sae(sae, [x[:2], x[2:]], dead_threshold=0.0)
    assert result["fvu"] == pytest.approx(18 / 10)
    assert result["explained_variance"] == pytest.approx(-0.8)
    assert result["n_rows"] == 3 and result["d_sae"] == 4
    # latents: [1,2,0,0], [0,0,0,0], [2,1,0,0] -> L0 = 4/3 ; latents 2 and 3 never fire
    assert result["l0"] == pytest.approx(4 / 3)
    assert result["fraction_zero"] == pytest.approx(1 - 4 / 12)
    assert result["dead_fraction"] == pytest.approx(0.5)
    x_hat = sae.decode(sae.encode(x)).detach()
    assert result["fvu_per_sample"] == pytest.approx(fvu(x, x_hat, per_sample=True))
    assert result["cosine"] == pytest.approx(cosine_similarity(x, x_hat))
    assert not any(sae.grad_was_enabled[:2])


def test_evaluate_sae_passes_encode_kwargs_and_max_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0]])
    result = evaluate_sae(MaskSAE(), [x], encode_kwargs={"k": 1}, max_rows=2)
    assert result["n_rows"] == 2
    assert result["l0"] == pytest.approx(0.5)  # only the first latent is kept: [1], [0]


def test_evaluate_sae_matches_plain_functions_for_a_saelens_topk_sae():
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(50, 8) + 2.0
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    streamed = evaluate_sae(sae, x.split(7))
    assert streamed["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-5)
    assert streamed["fvu_per_sample"] == pytest.approx(fvu(x, x_hat, per_sample=True), rel=1e-5)
    assert streamed["cosine"] == pytest.approx(cosine_similarity(x, x_hat), rel=1e-5)
    assert streamed["l0"] == pytest.approx(l0(z)) and streamed["l0"] <= 3
    assert streamed["fraction_zero"] == pytest.approx(fraction_zero(z))
