"""Matryoshka ``k`` is validated everywhere (issue 14): one ValueError naming the range, never ReLU latents by
accident (``k=385`` on 384 latents) nor a raw torch error (``k=2.5 | True | "8"``)."""

from __future__ import annotations

import pytest
import torch

from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE, MatryoshkaTopKSAEConfig

MESSAGE = r"k must be an integer in \[1, d_sae=384\] \(None: ReLU latents\); got "


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return MatryoshkaTopKSAE(MatryoshkaTopKSAEConfig(d_in=16, d_sae=384, k_levels=[8, 384]))


@pytest.mark.parametrize("k", [385, 0, -1, 2.5, True, "8", 8.0])
def test_train_bad_k_is_one_clear_error_in_encode_forward_and_reconstructions(sae, k):
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=MESSAGE + repr(k).replace(".", r"\.")):
        sae.encode(x, k=k)
    with pytest.raises(ValueError, match=MESSAGE):
        sae(x, k=k)
    with pytest.raises(ValueError, match=MESSAGE):
        sae.reconstructions(x, ks=[8, k])


def test_train_good_k_still_works(sae):
    x = torch.randn(3, 16)
    assert (sae.encode(x, k=8) > 0).sum(-1).max() <= 8
    assert torch.equal(sae.encode(x, k=384), sae.encode(x))  # k = d_sae is the ReLU level
    assert set(sae.reconstructions(x, ks=[8, None, 384])) == {8, None, 384}
    with pytest.raises(ValueError, match=r"inference_k must be an integer in \[1, d_sae=384\]"):
        MatryoshkaTopKSAEConfig(d_in=16, d_sae=384, inference_k=385)
