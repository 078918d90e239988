"""Training you can watch (issue 13): metrics.jsonl, the bar's postfix, the PNG plots and the per-k table."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch
from PIL import Image
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from vision_training_helpers import shared_tiny, synthetic_images, tiny_config

import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
from sae_vision_ext._saelens_compat import build_training_sae
from sae_vision_ext.training.config import sae_config_from_dict
from sae_vision_ext.training.monitor import (
    CURVES_FILENAME,
    FVU_VS_K_FILENAME,
    METRICS_FILENAME,
    TrainingMonitor,
    read_metrics,
)
from sae_vision_ext.training.runner import VisionSAETrainingRunner

HOOK = "blocks.1.hook_resid_post"
MSAE = {
    "architecture": "matryoshka_topk",
    "d_in": 192,
    "d_sae": 256,
    "k_levels": [8, 32, 256],
    "level_weighting": "reverse",
    "standardize_input": True,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(cfg):
    model, preprocess = shared_tiny(cfg.seed)
    return VisionSAETrainingRunner(
        cfg, images=synthetic_images(), model=model, preprocess=preprocess, say=lambda m: None
    ).run()


def _msae_config(output, **overrides):
    return tiny_config(
        output, sae=MSAE, eval_holdout_images=2, n_eval_images=8, n_batches_for_norm_estimate=2, **overrides
    )


def _assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as image:
        assert image.width >= 500 and image.height >= 300


def _finite(value):
    return value is not None and math.isfinite(value)


# ----------------------------------------------------------------------------------------------- a whole run


def test_msae_run_logs_every_step_plots_and_prints_the_per_k_table(tmp_path, capsys):
    out = tmp_path / "run"
    result = _train(_msae_config(out, verbose=True))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("training SAE: 100%")][-1]
    pattern = r"loss=\S+ mse@8=\S+ @32=\S+ @256=\S+ L0=[\d.]+ dead=[\d.]+% images=\d+ skipped=0"
    assert re.search(pattern, final), final
    records = read_metrics(out / METRICS_FILENAME)
    # 24 steps, fewer than the ~200 records a run gets: one record per step
    assert [r["step"] for r in records] == list(range(1, 25))
    assert [r["rows"] for r in records] == [64 * s for s in range(1, 25)]
    weights = [3 / 6, 2 / 6, 1 / 6]  # "reverse": the sparsest level weighs most
    for r in records:
        assert r["hook"] == HOOK and r["steps_averaged"] == 1 and r["rows_per_s"] > 0
        assert set(r["mse_per_k"]) == {"8", "32", "256"} and "mse_kind" not in r
        levels = [r["mse_per_k"][k] for k in ("8", "32", "256")]
        assert all(_finite(v) and v > 0 for v in [r["loss"], r["mse"], r["lr"], *levels])
        assert r["mse"] == levels[-1]
        # the loss is the SAE's weighted sum of its level losses: the parts are the step's own numbers
        assert r["loss"] == pytest.approx(sum(w * v for w, v in zip(weights, levels)), rel=1e-4)
        assert 0 < r["l0"] <= 256 and 0 <= r["dead_fraction"] <= 1
    assert records[0]["lr"] == pytest.approx(3e-3)
    assert [r["wall_s"] for r in records] == sorted(r["wall_s"] for r in records)
    late = records[-6:]
    assert sum(r["mse_per_k"]["8"] for r in late) > sum(r["mse_per_k"]["256"] for r in late)

    # held-out metrics at each k, in the result and in eval_metrics.json
    per_k = result.metrics[HOOK]["per_k"]
    assert [(row["k"], row["relu"]) for row in per_k] == [(8, False), (32, False), (256, True)]
    assert json.loads((out / "eval_metrics.json").read_text())["per_k"] == per_k
    fvus = [row["fvu"] for row in per_k]
    assert fvus[-1] == min(fvus) and fvus[0] > fvus[-1]
    assert per_k[-1]["fvu"] == pytest.approx(result.metrics[HOOK]["fvu"])  # k = d_sae is the ReLU encode
    assert [row["l0"] for row in per_k[:2]] == [8, 32]

    summary = result.summary()
    for row in per_k:
        label = f"{row['k']} (ReLU)" if row["relu"] else str(row["k"])
        pattern = rf"^\s+{re.escape(label)} \| +{row['fvu']:.4f} \| +{row['cosine']:.4f} \| +{row['l0']:.1f}$"
        assert re.search(pattern, summary, re.M), (pattern, summary)
    assert str(out / METRICS_FILENAME) in summary
    assert result.metrics_log == out / METRICS_FILENAME
    assert result.plots == [out / CURVES_FILENAME, out / FVU_VS_K_FILENAME]
    for plot in result.plots:
        assert str(plot) in summary
        _assert_png(plot)


def test_several_hooks_share_one_log_and_a_plain_sae_gets_no_fvu_vs_k(tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    out = tmp_path / "run"
    result = _train(tiny_config(out, hook_name=hooks, training_rows=64 * 6))
    records = read_metrics(out / METRICS_FILENAME)
    assert [(r["step"], r["hook"]) for r in records] == [(s, h) for s in range(1, 7) for h in hooks]
    for r in records:
        assert "mse_per_k" not in r and _finite(r["mse"]) and r["mse"] == r["losses"]["mse_loss"]
        assert "auxiliary_reconstruction_loss" in r["losses"]  # TopK's aux loss: every part the SAE reports
        assert r["l0"] == pytest.approx(8)  # TopK k=8
    assert all("per_k" not in m for m in result.metrics.values())
    assert result.plots == [out / CURVES_FILENAME] and not (out / FVU_VS_K_FILENAME).exists()
    _assert_png(out / CURVES_FILENAME)
    assert "| FVU |" not in result.summary().replace(" ", "")


# ----------------------------------------------------------------------------------------------- resume


def test_interrupted_run_keeps_its_curve_and_resume_continues_it(tmp_path, monkeypatch):
    original = SAETrainer.step
    calls = {"n": 0}

    def step_then_sigterm(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(SAETrainer, "step", step_then_sigterm)
    out = tmp_path / "run"
    stopped = _train(_msae_config(out))
    assert stopped.interrupted and stopped.checkpoint.name == str(7 * 64)
    log = out / METRICS_FILENAME
    assert [r["step"] for r in read_metrics(log)] == list(range(1, 8))
    assert str(log) in stopped.summary()
    assert not (out / CURVES_FILENAME).exists()  # plots only at the end of a finished run
    monkeypatch.setattr(SAETrainer, "step", original)

    # what a run killed after its checkpoint leaves behind: records past the checkpoint, a torn last line
    stale = {**read_metrics(log)[-1], "loss": 1e9}
    with open(log, "a") as f:
        for step in (8, 9, 10):
            f.write(json.dumps({**stale, "step": step, "rows": 64 * step}) + "\n")
        f.write('{"step": 11, "ro')
    resumed = _train(_msae_config(out, resume_from_checkpoint="latest"))
    assert not resumed.interrupted
    records = read_metrics(log)
    assert [r["step"] for r in records] == list(range(1, 25))
    assert [r["rows"] for r in records] == [64 * s for s in range(1, 25)]
    assert all(r["loss"] < 1e9 for r in records)
    assert all(later["wall_s"] >= earlier["wall_s"] for earlier, later in zip(records, records[1:]))
    assert len(log.read_text().splitlines()) == 24  # nothing torn or stale left in the file
    _assert_png(out / CURVES_FILENAME)


def test_a_new_run_in_the_same_folder_starts_a_new_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS_FILENAME).write_text(json.dumps({"step": 99, "rows": 1, "hook": HOOK, "loss": 1.0}) + "\n")
    _train(tiny_config(out, training_rows=64 * 3))
    assert [r["step"] for r in read_metrics(out / METRICS_FILENAME)] == [1, 2, 3]


# ----------------------------------------------------------------------------------------- the monitor alone


def _saelens_trainer(sae_cfg, steps=7, batch=64):
    torch.manual_seed(0)
    sae = build_training_sae(sae_config_from_dict(sae_cfg))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=1e-3,
        lr_end=1e-4,
        dead_feature_window=3,
    )
    return SAETrainer(cfg, sae, iter(()))


def test_records_average_the_steps_between_them_and_close_writes_the_rest(tmp_path):
    trainer = _saelens_trainer({**MSAE, "standardize_input": False})
    monitor = TrainingMonitor(tmp_path, {HOOK: trainer}, total_rows=64 * 100, batch_rows=64, every=5)
    rows = torch.randn(7, 64, 192, generator=torch.Generator().manual_seed(1))
    for batch in rows:  # the way MultiSAETrainer drives its per-hook trainers
        trainer.step(batch)
        trainer.n_training_steps += 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]  # written and flushed while training
    monitor.close()
    records = read_metrics(tmp_path)
    assert [(r["step"], r["rows"], r["steps_averaged"]) for r in records] == [(5, 320, 5), (7, 448, 2)]
    # dead fraction: latents silent in the last min(dead_feature_window=3, step) steps, from SAELens's counter
    silent = (trainer.n_forward_passes_since_fired >= 3).float().mean().item()
    assert records[-1]["dead_fraction"] == pytest.approx(silent)


def test_postfix_shows_loss_mse_per_level_l0_and_dead_compactly(tmp_path):
    trainer = _saelens_trainer({**MSAE, "standardize_input": False})
    monitor = TrainingMonitor(tmp_path, {HOOK: trainer}, total_rows=64 * 100, batch_rows=64, every=1)
    assert monitor.postfix() == ""  # no step yet
    texts = []
    for scale in (1.0, 10.0):
        trainer.step(scale * torch.randn(64, 192))
        trainer.n_training_steps += 1
        texts.append(monitor.postfix())
        assert monitor.postfix() == texts[-1]  # no new step: the same text
    pattern = r"loss=(\S+) mse@8=\S+ @32=\S+ @256=(\S+) L0=[\d.]+ dead=[\d.]+%"
    for text, record in zip(texts, read_metrics(tmp_path)):
        match = re.fullmatch(pattern, text)
        assert match, text
        # each text shows the steps since the previous one only (here: the step of that record)
        assert match.groups() == (f"{record['loss']:.3g}", f"{record['mse_per_k']['256']:.3g}")

    many = {
        "architecture": "matryoshka_topk",
        "d_in": 192,
        "d_sae": 4096,
        "k_levels": [16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
    }
    trainer = _saelens_trainer(many)
    monitor = TrainingMonitor(tmp_path / "many", {HOOK: trainer}, total_rows=64 * 100, batch_rows=64)
    trainer.step(torch.randn(64, 192))
    trainer.n_training_steps += 1
    text = monitor.postfix()
    assert len(text) <= 80, text
    assert re.fullmatch(r"loss=\S+ mse@16\.\.4096=\S+\.\.\S+ L0=[\d.]+ dead=[\d.]+%", text), text
    monitor.close()
