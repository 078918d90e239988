"""Publishing vision SAEs on the Hugging Face Hub in SAELens's layout, with a model card.

Repository layout (what ``SAE.from_pretrained("org/repo", "<sae_id>")`` reads, after
``import sae_vision_ext`` for the plugin's architectures)::

    README.md                      model card: library, vision model, hook, metrics, loading snippet
    <sae_id>/cfg.json              SAELens config (architecture, d_in, d_sae, metadata)
    <sae_id>/sae_weights.safetensors
    <sae_id>/sparsity.safetensors  (optional)

:func:`save_hub_folder` writes that layout locally (inspect it, or upload it with any tool);
:func:`push_to_hub` uploads with SAELens's ``upload_saes_to_huggingface`` and then the model card.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData
from sae_lens.constants import RUNNER_CFG_FILENAME, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.training.upload_saes_to_huggingface import upload_saes_to_huggingface

SAEOrPath = Any  # an SAELens SAE, or a folder holding cfg.json + sae_weights.safetensors
_COPIED = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME)


def _cfg_of(sae: SAEOrPath) -> dict[str, Any]:
    if hasattr(sae, "cfg"):
        return sae.cfg.to_dict()
    cfg_path = Path(sae) / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"SAE config file not found: {cfg_path}")
    if not (Path(sae) / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"SAE weights file not found: {Path(sae) / SAE_WEIGHTS_FILENAME}")
    return json.loads(cfg_path.read_text())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def model_card(
    repo_id: str,
    cfgs: Mapping[str, dict[str, Any]],
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    description: str = "",
) -> str:
    """Markdown model card for the SAEs ``cfgs`` ({sae_id: cfg dict}) with optional ``metrics`` per SAE.

    Names the library (SAELens + sae-vision-ext), each SAE's vision model and hook, and the metrics.
    """
    metrics = metrics or {}
    metric_names = sorted({name for values in metrics.values() for name in values})
    models = sorted({str(c.get("metadata", {}).get("model_name")) for c in cfgs.values()} - {"None"})
    architectures = sorted({str(c.get("architecture")) for c in cfgs.values()})
    data = ModelCardData(
        library_name="saelens",
        tags=["sae-vision-ext", "saelens", "sparse-autoencoder", "vision", *architectures],
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# Vision sparse autoencoders: {repo_id}",
        "",
        description
        or (
            f"Sparse autoencoders on the activations of {', '.join(models) or 'a vision model'}, "
            "for the [SAELens](https://github.com/decoderesearch/SAELens) library with the "
            "`sae-vision-ext` plugin."
        ),
        "",
        "| SAE id | architecture | vision model | hook | tokens | d_in | d_sae |"
        + "".join(f" {m} |" for m in metric_names),
        "|---|---|---|---|---|---|---|" + "---|" * len(metric_names),
    ]
    for sae_id, cfg in cfgs.items():
        meta = cfg.get("metadata", {})
        row = [
            sae_id,
            cfg.get("architecture"),
            meta.get("model_name"),
            meta.get("hook_name"),
            meta.get("token_selection"),
            cfg.get("d_in"),
            cfg.get("d_sae"),
        ]
        row += [metrics.get(sae_id, {}).get(m) for m in metric_names]
        lines.append(
            "| " + " | ".join(f"`{_fmt(v)}`" if i == 0 else _fmt(v) for i, v in enumerate(row)) + " |"
        )
    first = next(iter(cfgs), "<sae_id>")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import sae_vision_ext  # registers the plugin's architectures with SAELens",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{first}")',
        "model, preprocess = sae_vision_ext.load_vision_model(sae.cfg.metadata.model_name)",
        "_, cache = model.run_with_cache(images, names_filter=sae.cfg.metadata.hook_name)",
        "latents = sae.encode(cache[sae.cfg.metadata.hook_name])",
        "```",
        "",
        "Install with `pip install sae-vision-ext` (brings `sae-lens`).",
    ]
    if metric_names:
        lines += [
            "",
            "Metrics: " + ", ".join(metric_names) + " (as measured by the uploader, on held-out "
            "activations of the hook above).",
        ]
    return "\n".join(lines) + "\n"


def save_hub_folder(
    saes: Mapping[str, SAEOrPath],
    out_dir: str | os.PathLike,
    repo_id: str,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    description: str = "",
) -> Path:
    """Write ``saes`` ({sae_id: SAE or SAELens folder}) and README.md in the Hub layout under ``out_dir``."""
    if not saes:
        raise ValueError("no SAEs to save")
    out = Path(out_dir)
    cfgs = {}
    for sae_id, sae in saes.items():
        if not sae_id or sae_id.startswith("/") or ".." in Path(sae_id).parts:
            raise ValueError(
                f"invalid sae id {sae_id!r}: use a relative folder name such as 'blocks.11.hook_resid_post'"
            )
        cfgs[sae_id] = _cfg_of(sae)
        folder = out / sae_id
        if hasattr(sae, "save_model"):
            sae.save_model(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for name in _COPIED:
                if (Path(sae) / name).is_file():
                    shutil.copyfile(Path(sae) / name, folder / name)
    (out / "README.md").write_text(model_card(repo_id, cfgs, metrics, description))
    return out


def push_to_hub(
    saes: Mapping[str, SAEOrPath],
    repo_id: str,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    description: str = "",
    revision: str = "main",
) -> None:
    """Upload ``saes`` with SAELens's uploader, then the model card (replacing any README.md)."""
    cfgs = {sae_id: _cfg_of(sae) for sae_id, sae in saes.items()}  # validates before any upload
    upload_saes_to_huggingface(
        dict(saes), repo_id, hf_revision=revision, show_progress=False, add_default_readme=False
    )
    HfApi().upload_file(
        path_or_fileobj=io.BytesIO(model_card(repo_id, cfgs, metrics, description).encode()),
        path_in_repo="README.md",
        repo_id=repo_id,
        revision=revision,
        commit_message="Add sae-vision-ext model card",
    )
