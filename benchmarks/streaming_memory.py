"""Peak memory of a long read from an image stream stays flat: positions read epoch after epoch, as caching
does.

Writes WebDataset tar shards (or one parquet file, read as an HF streaming dataset) of small PNG images, then
reads positions from the stream in order through ``image_batches`` (decode, crop / flip augmentation, resize
to a tensor; the DataLoader path ``sae-vision cache`` and ``train`` use), printing the process's peak RSS
(``ru_maxrss``) after each checkpoint. A reader that kept anything per sample would show a peak that rises
with the positions read.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from sae_vision_ext.activations.images import PositionedImages, image_batches, open_images

EPILOG = """examples:
  python benchmarks/streaming_memory.py                      # tar shards, 10k then 50k positions
  python benchmarks/streaming_memory.py --source parquet     # HF datasets streaming over a parquet file
  python benchmarks/streaming_memory.py --checkpoints 2000 10000             # quick check
"""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def write_tars(root: Path, images: list[Image.Image], n_shards: int) -> str:
    per_shard = -(-len(images) // n_shards)
    for shard in range(n_shards):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as archive:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, len(images))):
                buffer = io.BytesIO()
                images[i].save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{i:08d}.png")
                info.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(info, buffer)
    return str(root)


def write_parquet(root: Path, images: list[Image.Image]) -> str:
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(str(root / "train.parquet"))
    return f"hf-stream:{root}"


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((32, 32)), dtype=np.float32)).permute(2, 0, 1) / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("tar", "parquet"), default="tar")
    parser.add_argument("--images", type=int, default=2000, help="images in the stream")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[10_000, 50_000], help="positions read")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers (0: the stream is read in this process, whose peak is measured)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        images = _images(args.images, args.size)
        dataset = (
            write_tars(Path(tmp), images, args.shards)
            if args.source == "tar"
            else write_parquet(Path(tmp), images)
        )
        del images
        stream = PositionedImages(open_images(dataset), to_tensor, seed=0, augment="crop_flip")
        print(f"{args.source}: {len(stream):,} images; peak RSS before reading {peak_rss_mb():,.0f} MiB")
        batches = image_batches(stream, 0, args.batch, end=max(args.checkpoints), num_workers=args.workers)
        started, peaks, pending = time.perf_counter(), [], sorted(args.checkpoints)
        for batch in batches:
            read = batch.end
            if read >= pending[0]:
                pending.pop(0)
                peaks.append(peak_rss_mb())
                print(
                    f"  {read:,} positions ({read / len(stream):.1f} passes): peak RSS {peaks[-1]:,.0f} MiB, "
                    f"{read / (time.perf_counter() - started):,.0f} images/s"
                )
    print(f"peak RSS ratio last / first checkpoint: {peaks[-1] / peaks[0]:.3f} (flat: ~1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
