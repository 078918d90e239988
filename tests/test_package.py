"""The package itself: ``import sae_vision_ext`` is instant and still registers everything with SAELens,
whatever
is imported first; the public API a SAELens user expects is at the top level."""

from __future__ import annotations

import subprocess
import sys

import pytest

PLUGIN_ARCHITECTURES = ["a_sae", "archetypal_matryoshka_topk", "matryoshka_topk", "overcomplete", "ra_sae"]
REPORT = (
    "from sae_lens.registry import SAE_CLASS_REGISTRY as R, SAE_TRAINING_CLASS_REGISTRY as T\n"
    "from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS as L\n"
    f"print(sorted(k for k in R if k in {PLUGIN_ARCHITECTURES!r}), sorted(k for k in T if k in "
    f"{PLUGIN_ARCHITECTURES!r}), 'sae_vision_ext_msae' in L)\n"
)


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_is_light_and_imports_neither_torch_nor_sae_lens():
    out = run_python("import sys, sae_vision_ext; print('torch' in sys.modules, 'sae_lens' in sys.modules)")
    assert out == "False False"


@pytest.mark.parametrize(
    "first_import",
    [
        "import sae_vision_ext; import sae_lens",  # the documented order
        # SAELens already loaded
        pytest.param("import sae_lens; import sae_vision_ext", marks=pytest.mark.slow),
        # a method module imports SAELens
        pytest.param(
            "from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE", marks=pytest.mark.slow
        ),
        pytest.param("from sae_vision_ext.saes.archetypal import RASAE", marks=pytest.mark.slow),
        pytest.param(
            "from sae_vision_ext.loading.overcomplete import OvercompleteSAE", marks=pytest.mark.slow
        ),
        "import sae_vision_ext.training.runner",  # a module of another layer imports SAELens
    ],
)
def test_every_import_order_registers_every_architecture_and_release(first_import):
    out = run_python(f"{first_import}\n{REPORT}")
    trainable = [name for name in PLUGIN_ARCHITECTURES if name != "overcomplete"]  # inference-only converter
    assert out == f"{PLUGIN_ARCHITECTURES} {trainable} True"


def test_public_api_at_the_top_level():
    import sae_vision_ext
    from sae_vision_ext import (
        RASAE,
        HookedVisionModel,
        MatryoshkaTopKSAE,
        MatryoshkaTopKTrainingSAEConfig,
        RASAETrainingSAEConfig,
        VisionSAERunnerConfig,
        VisionSAETrainingRunner,
        load_model_for_sae,
        load_vision_model,
    )

    assert MatryoshkaTopKSAE.__module__ == "sae_vision_ext.saes.matryoshka_topk"
    assert RASAE.__module__ == "sae_vision_ext.saes.archetypal"
    assert MatryoshkaTopKTrainingSAEConfig.architecture() == "matryoshka_topk"
    assert RASAETrainingSAEConfig.architecture() == "ra_sae"
    assert VisionSAETrainingRunner.__name__ == "VisionSAETrainingRunner" and callable(load_vision_model)
    assert callable(load_model_for_sae) and HookedVisionModel.__name__ == "HookedVisionModel"
    assert VisionSAERunnerConfig(sae=None).pretrained is True  # the real run is the default
    assert set(sae_vision_ext.__all__) <= set(dir(sae_vision_ext))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sae_vision_ext.nope  # noqa: B018
