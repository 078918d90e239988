"""Does a loaded SAE belong on this model's hook?"""

from __future__ import annotations

import warnings
from typing import Any


def check_sae_fits_model(sae: Any, model: Any, hook_name: str | None = None) -> str:
    """Raise ValueError unless ``sae.cfg.d_in`` is the width of ``hook_name`` on ``model``; return the hook.

    ``hook_name`` defaults to the SAE's ``cfg.metadata.hook_name``; an unknown hook raises the model's
    own error, which lists the valid names. A different ``metadata.model_name`` only warns: SAEs can
    transfer between checkpoints of one architecture, but it is rarely intended.
    """
    meta = sae.cfg.metadata
    hook_name = hook_name or meta.get("hook_name")
    if not hook_name:
        raise ValueError("the SAE's metadata names no hook; pass hook_name=... (e.g. 'hook_image_embed')")
    width = model.hook_width(hook_name)
    model_name = getattr(getattr(model, "cfg", None), "model_name", None) or getattr(
        model, "spec", "the model"
    )
    if sae.cfg.d_in != width:
        trained_on = (
            f" (it was trained on {meta.get('model_name')} {meta.get('hook_name')})"
            if meta.get("model_name")
            else ""
        )
        raise ValueError(
            f"SAE width d_in={sae.cfg.d_in} does not match hook {hook_name!r} of {model_name}, whose "
            f"activations have width {width}{trained_on}"
        )
    if meta.get("model_name") and model_name != "the model" and meta.get("model_name") != model_name:
        warnings.warn(
            f"SAE was trained on {meta.get('model_name')}, not {model_name}", UserWarning, stacklevel=2
        )
    return hook_name


def warn_if_not_finite(sae: Any, where: str) -> list[str]:
    """Warn (``UserWarning``) when any floating tensor of ``sae`` holds NaN or inf; returns their names.

    Such an SAE encodes every input to NaN; it usually comes from a run that diverged.
    """
    bad = [
        name
        for name, tensor in sae.state_dict().items()
        if tensor.is_floating_point() and not bool(tensor.isfinite().all())
    ]
    if bad:
        warnings.warn(
            f"{where}: the SAE's {', '.join(bad)} hold NaN or inf values: it encodes every input to NaN "
            "(the run that made it diverged?)",
            UserWarning,
            stacklevel=2,
        )
    return bad
