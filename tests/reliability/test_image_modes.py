"""Issue 14: every PIL mode and array dtype becomes the RGB image a person would see (``to_rgb_image``).

Each image is built with numpy, and the expected pixels are computed by hand from the documented rules:
16-bit / 257, floats in [0, 1] x 255 (in [0, 255] kept, other ranges min-max), transparency on white.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from vision_training_helpers import shared_tiny

from sae_vision_ext.activations.images import ListImages, to_rgb_image
from sae_vision_ext.activations.source import ImageActivationSource

RNG = np.random.default_rng(0)
H, W = 5, 7


def rgb(image) -> np.ndarray:
    assert image.mode == "RGB" and image.size == (W, H)
    return np.asarray(image).astype(np.int64)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.int64)[..., None], 3, axis=-1)


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(color * a + 255 * (1 - a)).astype(np.int64)


def reopened(image, fmt: str):
    """The image written to and read back from a file of format ``fmt`` (as a folder of photos gives it)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return {"bytes": buffer.getvalue()}


def test_16_bit_png_is_divided_by_257():
    values = RNG.integers(0, 65536, size=(H, W), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = gray3(np.rint(values / 257))
    assert np.array_equal(rgb(to_rgb_image(image)), expected)
    assert np.array_equal(rgb(to_rgb_image(reopened(image, "PNG"))), expected)  # 16-bit PNG file
    assert np.array_equal(rgb(to_rgb_image(image.convert("I"))), expected)  # mode "I" (32-bit) holding 16-bit
    assert np.array_equal(rgb(to_rgb_image(values)), expected)  # a uint16 array


def test_float_tiff_in_0_1_is_scaled_by_255():
    values = RNG.random((H, W)).astype(np.float32)
    image = Image.fromarray(values)
    assert image.mode == "F"
    expected = gray3(np.rint(values.astype(np.float64) * 255))
    assert np.array_equal(rgb(to_rgb_image(reopened(image, "TIFF"))), expected)
    assert np.array_equal(rgb(to_rgb_image(image)), expected)


def test_float_ranges_other_than_0_1():
    in_255 = (RNG.random((H, W)) * 200 + 20).astype(np.float32)  # [0, 255]: kept, rounded
    assert np.array_equal(
        rgb(to_rgb_image(Image.fromarray(in_255))), gray3(np.rint(in_255.astype(np.float64)))
    )
    wide = (RNG.random((H, W)) * 4000 - 1000).astype(np.float32)  # any other range: min-max to [0, 255]
    lo, hi = float(wide.min()), float(wide.max())
    expected = gray3(np.rint((wide.astype(np.float64) - lo) * (255 / (hi - lo))))
    out = rgb(to_rgb_image(Image.fromarray(wide)))
    assert np.array_equal(out, expected) and out.min() == 0 and out.max() == 255
    with_nan = RNG.random((H, W)).astype(np.float32)
    with_nan[1, 1] = np.nan
    assert rgb(to_rgb_image(Image.fromarray(with_nan)))[1, 1].tolist() == [0, 0, 0]


def test_grayscale_and_bilevel():
    values = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    assert np.array_equal(rgb(to_rgb_image(Image.fromarray(values))), gray3(values))  # "L"
    bits = RNG.random((H, W)) < 0.5
    image = Image.fromarray(bits)
    assert image.mode == "1"
    assert np.array_equal(rgb(to_rgb_image(image)), gray3(bits * 255))


def test_transparency_is_composited_on_white():
    color = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = Image.fromarray(np.dstack([color, alpha]))
    assert rgba.mode == "RGBA"
    expected = on_white(color, alpha)
    assert expected[0, 0].tolist() == [255, 255, 255] and expected[0, 1].tolist() == color[0, 1].tolist()
    assert np.array_equal(rgb(to_rgb_image(rgba)), expected)
    assert np.array_equal(rgb(to_rgb_image(reopened(rgba, "PNG"))), expected)

    gray = color[..., 0]
    la = Image.fromarray(np.dstack([gray, alpha]))
    assert la.mode == "LA"
    assert np.array_equal(rgb(to_rgb_image(la)), on_white(gray3(gray), alpha))


def test_palette_with_and_without_transparency():
    palette = RNG.integers(0, 256, size=(4, 3), dtype=np.uint8)
    index = RNG.integers(0, 4, size=(H, W), dtype=np.uint8)
    index[0, 0] = 2
    image = Image.fromarray(index)
    image.putpalette(palette.reshape(-1).tolist())
    assert image.mode == "P"
    assert np.array_equal(rgb(to_rgb_image(image)), palette[index])
    image.info["transparency"] = 2  # palette entry 2 is transparent: white
    expected = palette[index].astype(np.int64)
    expected[index == 2] = 255
    assert np.array_equal(rgb(to_rgb_image(image)), expected)
    assert np.array_equal(rgb(to_rgb_image(reopened(image, "PNG"))), expected)

    alpha = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    pa = image.convert("PA")  # palette with an alpha band
    pa.putalpha(Image.fromarray(alpha))
    assert pa.mode == "PA"
    assert np.array_equal(rgb(to_rgb_image(pa)), on_white(palette[index], alpha))


def test_cmyk():
    cmyk = RNG.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    image = Image.frombytes("CMYK", (W, H), cmyk.tobytes())
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = (255 - c) * (255 - k) / 255
    assert np.abs(rgb(to_rgb_image(image)) - expected).max() <= 1  # Pillow's conversion, to rounding


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_arrays_and_tensors_of_every_dtype(dtype):
    values = RNG.random((H, W, 3))
    expected = np.rint(values.astype(dtype).astype(np.float64) * 255).astype(np.int64)
    assert np.array_equal(rgb(to_rgb_image(values.astype(dtype))), expected)
    tensor = torch.from_numpy(values.astype(dtype))
    assert np.array_equal(rgb(to_rgb_image(tensor)), expected)
    assert np.array_equal(rgb(to_rgb_image(tensor.permute(2, 0, 1))), expected)  # channels first
    assert np.array_equal(rgb(to_rgb_image(ListImages([values.astype(dtype)]).load(0))), expected)


def test_bfloat16_tensor_and_a_whole_pipeline_of_float64_images():
    values = torch.rand(3, H, W, dtype=torch.bfloat16)
    expected = np.rint(values.float().permute(1, 2, 0).numpy().astype(np.float64) * 255)
    assert np.array_equal(rgb(to_rgb_image(values)), expected)

    model, preprocess = shared_tiny()
    images = [
        torch.rand(3, 40, 48, dtype=torch.float64),
        np.random.default_rng(1).random((40, 48, 3)),
        torch.rand(40, 48, 3, dtype=torch.float16),
        values,
    ]
    source = ImageActivationSource(
        model, preprocess, images, "blocks.1.hook_resid_post", "patches", model_batch_size=4
    )
    chunk = next(source.iter_chunks(0, 4))
    assert chunk.n_images_ok == 4 and chunk.n_images_failed == 0, source.failures
    assert chunk.rows["blocks.1.hook_resid_post"].dtype == torch.float32
    # preprocessed pixels of any float dtype reach the model in its own dtype
    for dtype in (torch.float64, torch.float16):
        rows = source.activations(torch.rand(2, 3, 32, 32).to(dtype))["blocks.1.hook_resid_post"]
        assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
