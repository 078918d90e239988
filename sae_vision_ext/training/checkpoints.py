"""What a training run keeps on disk: checkpoints that either are complete or do not exist, and the output
folder.

Checkpoints. SAELens's trainer writes its files (weights, trainer state, activation scaler, sparsity; for
several hooks one subfolder per hook) into ``<checkpoint_path>/.staging/<rows>`` and calls
``save_checkpoint_fn``; :func:`commit_checkpoint` then adds the data position and run facts
(``vision_state.json``), the RNG state and the runner config, fsyncs, and renames the folder to
``<checkpoint_path>/<rows>``. A folder with ``vision_state.json`` is a complete checkpoint
(:func:`committed_checkpoints`); :func:`checkpoint_damage` reads every file of one. Resuming
(:func:`checkpoint_state`, :func:`restore_checkpoint`) checks that the checkpoint belongs to the run last
started in its folder (``run_id.json``) and was made with the same settings, then restores trainer state,
weights, counters and RNG.

Output folder. :func:`publish_outputs` writes the final SAE(s) in SAELens's layout (``SAE.load_from_disk``
reads them) plus our extras (held-out metrics, runner config) into a temporary folder and moves them in
place, so a reader never sees half an SAE. :func:`check_output_free` refuses to start a new run over an
earlier one; :func:`remove_previous_run` (``--overwrite``) removes what a run wrote and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import load_file

from sae_vision_ext._saelens_compat import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    fix_resumed_counters,
    save_final_sae,
)
from sae_vision_ext.activations.cache import fsync_dir, write_json_atomic
from sae_vision_ext.training.monitor import CURVES_FILENAME, FVU_VS_K_FILENAME, METRICS_FILENAME

VISION_STATE_FILENAME = "vision_state.json"
RNG_STATE_FILENAME = "rng_state.pt"
EVAL_METRICS_FILENAME = "eval_metrics.json"
STAGING_DIRNAME = ".staging"
RUN_ID_FILENAME = "run_id.json"  # in the checkpoint folder: the run its checkpoints belong to
VISION_STATE_FORMAT = 1
# config fields that must match between a checkpoint and the run that resumes it (plus the whole sae section)
RESUME_KEYS = (
    "model_name", "pretrained", "model_weights", "hook_name", "token_selection", "dataset_path",
    "dataset_split", "image_column", "use_cached_activations", "cached_activations_path",
    "train_batch_size_rows", "seed", "augment", "crop_scale", "shuffle_images", "img_size",
    "buffer_size_rows", "activations_mixing_fraction", "images_per_segment", "eval_holdout_images",
    "model_batch_size", "autocast_model", "training_rows", "lr", "lr_end", "lr_scheduler_name",
    "lr_warm_up_steps", "lr_decay_steps", "lr_decay_fraction", "n_restart_cycles", "adam_beta1",
    "adam_beta2", "dead_feature_window", "feature_sampling_window", "n_batches_for_norm_estimate",
    "autocast", "dtype",
)  # fmt: skip
# what a finished run leaves in its output folder (in a subfolder per hook when there are several)
OUTPUT_FILENAMES = (
    SAE_WEIGHTS_FILENAME, SAE_CFG_FILENAME, SPARSITY_FILENAME, EVAL_METRICS_FILENAME, RUNNER_CFG_FILENAME,
    METRICS_FILENAME, CURVES_FILENAME, FVU_VS_K_FILENAME,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- the folders


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and prove a file can be written there; raise a readable error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"the {what} {path} is not writable ({type(err).__name__}: {err})") from err
    return path


def finished_run(output_path: str | os.PathLike, checkpoint_root: str | os.PathLike) -> list[Path]:
    """The SAE file(s) and complete checkpoints a run left in ``output_path`` / ``checkpoint_root``."""
    out = Path(output_path)
    saes = [out / SAE_WEIGHTS_FILENAME, *sorted(out.glob(f"*/{SAE_WEIGHTS_FILENAME}"))]
    return [p for p in saes if p.is_file()] + committed_checkpoints(checkpoint_root)


def check_output_free(
    output_path: str | os.PathLike, checkpoint_root: str | os.PathLike, resume: bool, overwrite: bool
) -> None:
    """Refuse (``FileExistsError``, one line) to start a new run where one already left an SAE or
    checkpoints, unless it is resumed (``--resume``) or replaced (``--overwrite``)."""
    if resume or overwrite:
        return
    found = finished_run(output_path, checkpoint_root)
    if found:
        n_checkpoints = len(committed_checkpoints(checkpoint_root))
        what = [f"the SAE {p}" for p in found if p.name == SAE_WEIGHTS_FILENAME][:1]
        what += [f"{n_checkpoints} checkpoint(s) in {checkpoint_root}"] if n_checkpoints else []
        raise FileExistsError(
            f"{output_path} already holds a run ({' and '.join(what)}): add --resume to continue it, or "
            "--overwrite to replace it (nothing was changed)"
        )


def remove_previous_run(output_path: str | os.PathLike, checkpoint_root: str | os.PathLike) -> list[Path]:
    """``--overwrite``: remove what an earlier run wrote (its SAE files, per-hook SAE folders, complete
    checkpoints, staging folders, run id); any other file stays. Returns what was removed."""
    out, root = Path(output_path), Path(checkpoint_root)
    removed = []
    per_hook = sorted(
        p.parent for p in out.glob(f"*/{SAE_WEIGHTS_FILENAME}") if (p.parent / SAE_CFG_FILENAME).exists()
    )
    for folder in [out, *per_hook]:
        for name in OUTPUT_FILENAMES:
            if (folder / name).is_file():
                (folder / name).unlink()
                removed.append(folder / name)
        if folder != out:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when nothing else is in it
    ours = committed_checkpoints(root)
    if root.is_dir():
        ours += [p for p in root.iterdir() if p.name == STAGING_DIRNAME or p.name.startswith(".replaced-")]
    for path in ours:
        shutil.rmtree(path)
        removed.append(path)
    if (root / RUN_ID_FILENAME).is_file():
        (root / RUN_ID_FILENAME).unlink()
        removed.append(root / RUN_ID_FILENAME)
    return removed


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before a rename publishes it)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def publish_outputs(
    output_path: Path,
    saes: dict[str, Any],
    sparsities: dict[str, torch.Tensor],
    metrics: dict[str, dict[str, Any]],
    runner_cfg: dict[str, Any],
) -> dict[str, Path]:
    """Write the final SAE(s) (SAELens's layout: :func:`~sae_vision_ext._saelens_compat.save_final_sae`),
    each with its held-out metrics, and the runner config; ``{hook: SAE folder}``.

    One hook: the SAE is ``output_path`` itself; several: ``output_path/<hook>``. Files are written to a
    temporary folder, fsynced, then moved in place one by one (``os.replace``), so each file a reader sees
    is whole.
    """
    tmp = output_path / f".writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    sae_paths = {}
    for hook, sae in saes.items():
        one = len(saes) == 1
        folder = save_final_sae(sae, tmp if one else tmp / hook, sparsities.get(hook))
        if metrics.get(hook):
            (folder / EVAL_METRICS_FILENAME).write_text(json.dumps(metrics[hook], indent=2))
        sae_paths[hook] = output_path if one else output_path / hook
    (tmp / RUNNER_CFG_FILENAME).write_text(json.dumps(runner_cfg, indent=2, default=str))
    fsync_tree(tmp)
    for src in sorted(tmp.rglob("*"), key=lambda p: len(p.parts)):
        dest = output_path / src.relative_to(tmp)
        if src.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            os.replace(src, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(output_path)
    return sae_paths


# ----------------------------------------------------------------------------------------------- finding


def committed_checkpoints(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``checkpoint_root``, oldest first (by training rows)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not (child / VISION_STATE_FILENAME).exists():
            continue
        digits = child.name.removeprefix("final_")
        if digits.isdigit():
            found.append((int(digits), child.name.startswith("final_"), child))
    return [p for _, _, p in sorted(found)]


def checkpoint_damage(path: Path) -> str | None:
    """None when every file of checkpoint ``path`` reads (safetensors, torch, JSON), else which file fails and
    how (a truncated or half-written file)."""
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix == ".pt":
                torch.load(file, map_location="cpu", weights_only=True)
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as err:  # noqa: BLE001  (any failure to read it is damage; the message says which)
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{file} cannot be read: {text}"
    return None


def resolve_checkpoint(
    spec: str | None, checkpoint_root: str | os.PathLike, say: Callable[[str], Any] | None = None
) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest complete checkpoint whose files all read (or None): a
    damaged newer one is passed over, and ``say`` tells which and why; else that folder (damaged:
    ``ValueError``)."""
    if spec is None:
        return None
    if spec == "latest":
        found = committed_checkpoints(checkpoint_root)
        damaged = []
        for path in reversed(found):
            damage = checkpoint_damage(path)
            if damage is None:
                if damaged and say is not None:
                    say(
                        f"checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}); falling back to the "
                        f"previous complete checkpoint {path}"
                    )
                return path
            damaged.append((path, damage))
        if damaged:
            raise ValueError(
                f"no readable checkpoint in {checkpoint_root}: all {len(found)} are damaged (the newest: "
                f"{damaged[0][1]}); train from scratch with --overwrite"
            )
        return None
    path = Path(spec)
    if not (path / VISION_STATE_FILENAME).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {VISION_STATE_FILENAME})")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise ValueError(
            f"checkpoint {path} is damaged ({damage}); resume from an earlier checkpoint (--resume FOLDER, "
            "or --resume for the newest readable one) or train from scratch"
        )
    return path


def current_run_id(checkpoint_root: str | os.PathLike) -> str | None:
    """The id of the run last started with this checkpoint folder (None: none recorded)."""
    try:
        return json.loads((Path(checkpoint_root) / RUN_ID_FILENAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def record_run_id(checkpoint_root: Path, run_id: str) -> None:
    """Mark ``run_id`` as the run last started in ``checkpoint_root`` (checkpoints of others can no longer be
    resumed)."""
    if current_run_id(checkpoint_root) != run_id:
        write_json_atomic(checkpoint_root / RUN_ID_FILENAME, {"run_id": run_id, "started_unix": time.time()})


# ----------------------------------------------------------------------------------------------- writing


def commit_checkpoint(staged: Path, checkpoint_root: Path, state: dict[str, Any], runner_cfg: dict) -> Path:
    """Complete SAELens's checkpoint folder ``staged`` with ``state`` (``vision_state.json``), the RNG state
    and the runner config, fsync it, and rename it to ``checkpoint_root/<its name>`` (an older folder of that
    name is replaced). Returns the published folder."""
    torch.save({"torch_cpu": torch.random.get_rng_state()}, staged / RNG_STATE_FILENAME)
    with open(staged / RUNNER_CFG_FILENAME, "w") as f:
        json.dump(runner_cfg, f, default=str)
    write_json_atomic(staged / VISION_STATE_FILENAME, {"format": VISION_STATE_FORMAT, **state})
    fsync_tree(staged)
    final = checkpoint_root / staged.name
    if final.exists():
        aside = checkpoint_root / f".replaced-{final.name}-{os.getpid()}"
        os.rename(final, aside)
        os.rename(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staged, final)
    fsync_dir(checkpoint_root)
    return final


# ----------------------------------------------------------------------------------------------- resuming


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sae": {"k": 8}}`` -> ``{"sae.k": 8}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_fingerprint(cfg_dict: dict[str, Any], buffer_rows: int) -> dict[str, Any]:
    """The settings that change a run's result (:data:`RESUME_KEYS`, the sae section, the effective buffer),
    as JSON values: a checkpoint resumes only under the same fingerprint."""
    out = {k: cfg_dict.get(k) for k in RESUME_KEYS}
    # the whole sae section (k, k_levels, level_weighting, ...); where it lives and its free-form notes aside
    out["sae"] = {k: v for k, v in cfg_dict["sae"].items() if k not in ("metadata", "device")}
    out["effective_buffer_rows"] = buffer_rows
    return json.loads(json.dumps(out, default=str))


def checkpoint_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``vision_state.json``, after checking that it belongs to the run last started in its
    folder and was made with ``fingerprint`` (:func:`resume_fingerprint` of this run's config)."""
    state = json.loads((path / VISION_STATE_FILENAME).read_text())
    current = current_run_id(path.parent)
    if state.get("run_id") != current:
        raise ValueError(
            f"checkpoint {path} belongs to another run (run id {state.get('run_id')}) than the one last "
            f"started in {path.parent} (run id {current}), which wrote no checkpoint: refusing to continue "
            "the other run; train from scratch with --overwrite"
        )
    expected, saved = _flat(fingerprint), _flat(state.get("resume_fingerprint", {}))
    changed = sorted(k for k in expected.keys() | saved.keys() if saved.get(k) != expected.get(k))
    if changed:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {expected.get(k)!r}" for k in changed)
        raise ValueError(
            f"checkpoint {path} was made with a different config (differs in: {', '.join(changed)}) "
            f"({details}); resume with the same config, or train from scratch with --overwrite"
        )
    return state


def restore_checkpoint(trainer: Any, path: Path) -> None:
    """Load checkpoint ``path`` into an ``SAETrainer`` or ``MultiSAETrainer`` (trainer state, weights,
    counters) and restore the torch RNG, so training continues as if it had not stopped."""
    if isinstance(trainer, MultiSAETrainer):
        trainer.load_checkpoint(path)
    else:
        trainer.load_trainer_state(path)
        trainer.sae.load_weights_from_checkpoint(path)
    fix_resumed_counters(trainer)
    rng = torch.load(path / RNG_STATE_FILENAME, weights_only=True)
    torch.random.set_rng_state(rng["torch_cpu"])
