"""The deferred half of registering the plugin with SAELens (the hook is in ``sae_vision_ext/__init__.py``).

When one of our self-registering modules is what imported SAELens, the hook fires while that module's classes
do not exist yet: the hook then only calls :func:`defer`, and the module calls :func:`resume_registration` at
its end. A base module (it imports no layer), so that ``saes`` and ``loading`` can call it without
importing the package root.
"""

import sys

_deferred = False


def defer() -> None:
    global _deferred
    _deferred = True


def resume_registration() -> None:
    """Called at the end of each self-registering module: completes a registration deferred by the hook."""
    global _deferred
    if _deferred:
        _deferred = False
        # The package root is always imported before any of its submodules, so this is a call, not an import.
        sys.modules["sae_vision_ext"].register_architectures()
