"""The archetypal architectures train inside SAELens's own LanguageModelSAETrainingRunner."""

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.constants import SAE_WEIGHTS_FILENAME
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_vision_ext  # noqa: F401  (registers the architectures)
from sae_vision_ext.saes import archetypal
from sae_vision_ext.saes.candidates_file import Candidates

D_MODEL, CTX = 16, 8


def tiny_model_and_tokens():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_MODEL, n_ctx=CTX, d_head=4, n_heads=4, d_vocab=50, act_fn="relu", d_mlp=32
    )
    model = HookedTransformer(cfg)
    tokens = torch.randint(0, 50, (64, CTX))
    return model, Dataset.from_dict({"tokens": tokens.tolist()})


CONFIGS = [
    ("ra_sae", archetypal.RASAETrainingSAEConfig, {"delta": 0.5, "k": 4}),
    ("a_sae", archetypal.ASAETrainingSAEConfig, {"k": 4}),
    (
        "archetypal_matryoshka_topk",
        archetypal.ArchetypalMatryoshkaTopKTrainingSAEConfig,
        {"delta": 0.5, "k_levels": [2, 8, 32]},
    ),
]


@pytest.mark.parametrize("name,cfg_cls,extra", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_trains_in_sae_lens_runner(tmp_path, name, cfg_cls, extra):
    model, dataset = tiny_model_and_tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.tensor(dataset["tokens"][:8]), names_filter="blocks.0.hook_resid_post"
        )
    rows = cache["blocks.0.hook_resid_post"].reshape(-1, D_MODEL)
    Candidates.from_points(rows[:48]).save(tmp_path / "c.safetensors")
    sae_cfg = cfg_cls(d_in=D_MODEL, d_sae=32, candidates_path=str(tmp_path / "c.safetensors"), **extra)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny-random",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="",
        context_size=CTX,
        training_tokens=640,
        train_batch_size_tokens=32,
        n_batches_in_buffer=4,
        store_batch_size_prompts=4,
        prepend_bos=False,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(tmp_path / "out"),
        checkpoint_path=str(tmp_path / "ckpt"),
        n_checkpoints=1,
    )
    sae = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model).run()
    assert sae.cfg.architecture() == name
    # every weights file SAELens's runner wrote (the final SAE and the checkpoint) is feasible
    files = [
        tmp_path / "out" / SAE_WEIGHTS_FILENAME,
        *sorted((tmp_path / "ckpt").rglob(SAE_WEIGHTS_FILENAME)),
    ]
    assert len(files) == 2
    for path in files:
        state = load_file(path)
        W = state["archetypal.W"]
        assert W.min() >= 0, path
        torch.testing.assert_close(W.sum(1), torch.ones(32), atol=1e-5, rtol=0, msg=str(path))
        if sae_cfg.delta > 0:
            assert (state["archetypal.Lambda"].norm(dim=1) <= sae_cfg.delta * (1 + 1e-5)).all(), path
    assert not torch.equal(load_file(files[0])["archetypal.W"], torch.eye(32, 48))  # it trained
    assert torch.isfinite(sae.W_dec).all()
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert loaded.cfg.architecture() == name
    x = rows[:10]
    sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
