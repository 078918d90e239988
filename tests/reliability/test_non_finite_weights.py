"""An SAE whose weights hold NaN / inf is reported when it is loaded for evaluation or converted (issue
14)."""

from __future__ import annotations

import warnings

import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from sae_vision_ext.cli import main as cli_main
from sae_vision_ext.evals.saved import load_sae_folder


def test_loading_an_sae_with_nan_weights_warns(tmp_path):
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
        sae.b_enc[0] = float("inf")
    sae.save_model(tmp_path / "sae")
    with pytest.warns(UserWarning, match=r"W_dec, b_enc hold NaN or inf values"):
        load_sae_folder(tmp_path / "sae")
    healthy = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
    healthy.save_model(tmp_path / "ok")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae_folder(tmp_path / "ok")


def test_convert_warns_about_nan_weights(tmp_path):
    state = {
        "model": {
            "pre_bias": torch.zeros(8),
            "encoder": torch.randn(8, 16),
            "latent_bias": torch.zeros(16),
            "decoder": torch.randn(16, 8),
        },
        "mean_center": torch.zeros(8),
        "scaling_factor": 1.0,
        "target_norm": 1.0,
    }
    state["model"]["decoder"][2, 2] = float("nan")
    torch.save(state, tmp_path / "msae.pth")
    with pytest.warns(UserWarning, match="converting .*msae.pth: the SAE's W_dec hold NaN or inf"):
        assert cli_main(["convert", str(tmp_path / "msae.pth"), str(tmp_path / "out")]) == 0
