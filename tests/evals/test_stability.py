"""Hungarian dictionary matching and the stability score."""

import numpy as np
import pytest
import torch

from sae_vision_ext.evals.stability import cosine_matrix, match_dictionaries, stability


def random_dictionary(n=50, d=20, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_same_dictionary_under_permutation_scale_and_sign_flips_has_stability_one():
    D = random_dictionary()
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    signs = torch.where(torch.rand(50, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    scales = torch.rand(50, generator=torch.Generator().manual_seed(3)) + 0.5
    D2 = D[perm] * (signs * scales)[:, None]
    assert stability(D, D2) == pytest.approx(1.0, abs=1e-12)
    rows, cols, cos = match_dictionaries(D, D2)
    # atom i of D is atom inv_perm[i] of D2
    inv = torch.argsort(perm).numpy()
    assert (cols[np.argsort(rows)] == inv).all()
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)
    # without sign flips the flipped atoms no longer count as matches
    assert stability(D, D2, allow_sign_flip=False) < 0.9


def test_stability_of_unrelated_dictionaries_is_low_and_matching_is_optimal():
    D1, D2 = random_dictionary(seed=0), random_dictionary(seed=1)
    s = stability(D1, D2)
    assert 0.1 < s < 0.6
    # the Hungarian matching beats the greedy diagonal and is one-to-one
    S = np.abs(cosine_matrix(D1, D2))
    rows, cols, cos = match_dictionaries(D1, D2)
    assert len(set(cols.tolist())) == 50
    assert cos.sum() >= np.diag(S).sum()
    assert cos.sum() == pytest.approx(S[rows, cols].sum())


def test_rectangular_numpy_and_sae_inputs():
    D = random_dictionary(30, 8)
    bigger = torch.cat([D, random_dictionary(20, 8, seed=9)])[torch.randperm(50)]
    rows, cols, cos = match_dictionaries(D.numpy(), bigger)
    assert len(rows) == 30 and np.allclose(cos, 1.0)

    class FakeSAE:
        W_dec = torch.nn.Parameter(D.clone())

    assert stability(FakeSAE(), D) == pytest.approx(1.0)
    # zero atoms match nothing
    Z = D.clone()
    Z[0] = 0
    assert stability(Z, D) == pytest.approx(29 / 30, abs=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="different widths"):
        stability(random_dictionary(5, 4), random_dictionary(5, 6))
    with pytest.raises(ValueError, match="2-D"):
        stability(torch.zeros(3), torch.zeros(3))
    bad = random_dictionary(5, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stability(bad, bad)
