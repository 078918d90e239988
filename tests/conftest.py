import os
import signal

# Every hub call would retry for ~45 s on this offline machine; tests use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

# The tests use tiny models: one thread avoids thread start-up and oversubscription costs on small ops.
torch.set_num_threads(1)


import pytest  # noqa: E402
from fake_hub import fake_hub  # noqa: E402,F401 - a local HTTP server standing in for the Hugging Face Hub


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache, offline: tests write the published file layouts into it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """SAELens's own runner installs SIGINT / SIGTERM handlers and leaves them: undo that after each test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Each test that takes ``device`` runs on the CPU and, under ``pytest -m cuda``, on the GPU. The default
    run deselects the CUDA half (the count shows as "deselected"); asking for it without a GPU fails."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.fail("the cuda tests were selected (-m cuda) but torch sees no CUDA device")
    return torch.device(request.param)
