"""The choices a run makes about its rows: token selection and augmentation.

Kept free of heavy imports (no torch), so configs and ``sae-vision --help`` can read them instantly.
"""

from __future__ import annotations

TOKEN_SELECTIONS = ("cls", "registers", "prefix", "patches", "spatial", "all")  # spatial: CNN maps
# selections that read one row per image from a fixed hook
POOLED_SELECTIONS = {"pooled": "hook_pooled", "embed": "hook_image_embed"}
ALL_SELECTIONS = TOKEN_SELECTIONS + tuple(POOLED_SELECTIONS)
AUGMENTATIONS = ("none", "crop_flip")


def resolve_hooks(hook_names: str | list[str] | tuple[str, ...] | None, token_selection: str) -> list[str]:
    """Hook names as a list; ``pooled`` / ``embed`` fill in (or check) their hook."""
    if token_selection not in ALL_SELECTIONS:
        raise ValueError(
            f"token_selection must be one of {', '.join(ALL_SELECTIONS)}; got {token_selection!r}"
        )
    if hook_names is None or hook_names == [] or hook_names == "":
        if token_selection in POOLED_SELECTIONS:
            return [POOLED_SELECTIONS[token_selection]]
        raise ValueError(f"a hook name is needed for token_selection={token_selection!r}")
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if len(set(names)) != len(names):
        raise ValueError(f"hook names repeat: {names}")
    if token_selection in POOLED_SELECTIONS:
        expected = POOLED_SELECTIONS[token_selection]
        if names != [expected]:
            raise ValueError(f"token_selection={token_selection!r} reads the hook {expected!r}, not {names}")
    return names
