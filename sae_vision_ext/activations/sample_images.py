"""Real photos available offline, for demos, examples and smoke tests.

Source: the sample images shipped inside scikit-image (``skimage.data``: astronaut, coffee, chelsea the
cat, rocket, ...; 8 colour photos then 8 greyscale photos converted to RGB). Without scikit-image the
one photo shipped with matplotlib (``grace_hopper.jpg``) is used. When more images are asked for than
exist, deterministic variants follow (mirror images, then centre crops at 80% and 60%), so every
returned image differs.
"""

from __future__ import annotations

from PIL import Image, ImageOps

COLOR_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "motorcycle",
    "immunohistochemistry",
    "retina",
)
GRAY_PHOTOS = ("camera", "moon", "coins", "grass", "gravel", "brick", "clock", "cell")


def _skimage_photos():
    """``[(name, PIL RGB image)]`` from skimage.data, or None when scikit-image is missing."""
    try:  # optional: without scikit-image, matplotlib's one photo is the fallback
        import skimage.data as data
    except ImportError:
        return None
    photos = []
    for name in COLOR_PHOTOS + GRAY_PHOTOS:
        try:
            array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        except Exception:  # noqa: BLE001 - a data file missing from this scikit-image build
            continue
        photos.append((name, Image.fromarray(array).convert("RGB")))
    return photos


def _matplotlib_photos():
    try:  # optional: the fallback when scikit-image is missing
        from matplotlib import cbook
    except ImportError:
        return None
    try:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        return [("grace_hopper", Image.open(path).convert("RGB"))]
    except Exception:  # noqa: BLE001 - sample data not installed
        return None


def _variants(name, image):
    yield f"{name}_mirrored", ImageOps.mirror(image)
    for fraction in (0.8, 0.6):
        w, h = image.size
        cw, ch = int(w * fraction), int(h * fraction)
        left, top = (w - cw) // 2, (h - ch) // 2
        yield f"{name}_crop{int(fraction * 100)}", image.crop((left, top, left + cw, top + ch))


def sample_images(n: int | None = None) -> list:
    """``n`` real RGB photos as PIL images (all base photos when ``n`` is None); ``img.info['name']``.

    Works offline. Raises ImportError naming the fix if neither scikit-image nor matplotlib is installed.
    """
    photos = _skimage_photos() or _matplotlib_photos()
    if not photos:
        raise ImportError(
            "sample_images needs scikit-image (pip install scikit-image) for its bundled "
            "photos, or matplotlib's sample data as a one-photo fallback"
        )
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = list(photos)
    if n is not None and n > len(pool):
        for round_index in range(3):
            pool += [list(_variants(name, image))[round_index] for name, image in photos]
            if len(pool) >= n:
                break
        if n > len(pool):
            raise ValueError(f"only {len(pool)} distinct sample images available, asked for {n}")
    chosen = pool if n is None else pool[:n]
    images = []
    for name, image in chosen:
        image.info["name"] = name
        images.append(image)
    return images
