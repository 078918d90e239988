"""Images in another dtype than the model's are a clear error naming the fix, not a dtype RuntimeError deep in
a convolution (issue 14)."""

from __future__ import annotations

import pytest
import torch
from vision_training_helpers import load_tiny


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_images_in_another_dtype_name_the_fix(dtype):
    model, _ = load_tiny()
    images = torch.rand(2, 3, 32, 32, dtype=dtype)
    with pytest.raises(
        TypeError, match=rf"runs in torch.float32, got images in {dtype}: pass images.to\(model.dtype\)"
    ):
        model(images)
    with torch.no_grad():
        assert model(images.to(model.dtype)).shape[0] == 2
