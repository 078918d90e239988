"""Peak memory of a long streaming run stays flat: >= 5M activation rows through the streaming readers into training.

Writes a small WebDataset tar set (or parquet files) of activation-row blocks, streams it epoch after epoch with
our reader (``WebDatasetArrays`` / ``HFStreamingRows``), mixes rows in SAELens's bounded mixing buffer, and feeds
the batches to SAELens's ``SAETrainer`` (a small TopK SAE), printing the process's peak RSS (``ru_maxrss``) after
1M and after 5M rows. A reader that kept anything per sample (tarfile's member index, a growing buffer) would
show it as a peak that rises with the rows read.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

EPILOG = """examples:
  python benchmarks/streaming_memory.py                       # tar shards, 5M rows of width 64, with training
  python benchmarks/streaming_memory.py --source parquet      # HF datasets streaming over parquet files
  python benchmarks/streaming_memory.py --rows 200000 --checkpoints 100000 200000 --no-train   # quick check
"""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return float("nan")


def write_tar_shards(root: Path, n_shards: int, samples_per_shard: int, block_rows: int, width: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_shards):
        path = root / f"rows-{s:04d}.tar"
        with tarfile.open(path, "w") as archive:
            for j in range(samples_per_shard):
                buffer = io.BytesIO()
                np.save(buffer, rng.standard_normal((block_rows, width)).astype(np.float32))
                info = tarfile.TarInfo(f"{s:04d}{j:06d}.npy")
                info.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(info, buffer)
        paths.append(str(path))
    return paths


def write_parquet_files(root: Path, n_files: int, samples_per_file: int, block_rows: int, width: int) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    features = datasets.Features({"acts": datasets.Array2D(shape=(block_rows, width), dtype="float32")})
    paths = []
    for f in range(n_files):
        blocks = rng.standard_normal((samples_per_file, block_rows, width)).astype(np.float32)
        path = root / f"rows-{f:04d}.parquet"
        datasets.Dataset.from_dict({"acts": blocks}, features=features).to_parquet(str(path))
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["tar", "parquet"], default="tar")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[1_000_000, 5_000_000],
                        help="row counts at which memory is printed")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--block-rows", type=int, default=256, help="rows per stored sample")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--buffer-rows", type=int, default=65536)
    parser.add_argument("--no-train", action="store_true", help="only read and mix, no SAE steps")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from sae_vision_ext.activations.streaming import (
        HFStreamingRows,
        StreamPart,
        WebDatasetArrays,
        shuffled_row_batches,
    )

    workdir = tempfile.TemporaryDirectory(prefix="streaming-bench-")
    root = Path(workdir.name)
    if args.source == "tar":
        files = write_tar_shards(root, args.shards, args.samples_per_shard, args.block_rows, args.width)
        stream = WebDatasetArrays(files, repeat=True).iter_part(StreamPart())
    else:
        files = write_parquet_files(root, args.shards, args.samples_per_shard, args.block_rows, args.width)
        stream = HFStreamingRows("parquet", "acts", data_files=files, repeat=True).iter_part(StreamPart())
    rows_per_epoch = args.shards * args.samples_per_shard * args.block_rows
    on_disk = sum(os.path.getsize(f) for f in files) / (1 << 20)
    print(f"source={args.source}: {len(files)} files, {on_disk:.1f} MiB on disk, {rows_per_epoch} rows per epoch "
          f"(streamed {args.rows / rows_per_epoch:.1f} times), width {args.width}")
    batches = shuffled_row_batches(stream, args.batch_size, buffer_rows=args.buffer_rows, seed=0)

    checkpoints = sorted(args.checkpoints)
    report: list[tuple[int, float, float, float]] = []
    started = time.perf_counter()

    def provider():
        served = 0
        for batch in batches:
            served += batch.shape[0]
            while checkpoints and served >= checkpoints[0]:
                report.append((checkpoints.pop(0), peak_rss_mb(), current_rss_mb(), time.perf_counter() - started))
                print(f"rows {report[-1][0]:>10,}: peak RSS {report[-1][1]:8.1f} MiB, current RSS "
                      f"{report[-1][2]:8.1f} MiB, {report[-1][3]:6.1f} s", flush=True)
            yield batch

    total = -(-args.rows // args.batch_size) * args.batch_size  # whole batches, at least --rows
    if args.no_train:
        for n, _ in enumerate(provider()):
            if (n + 1) * args.batch_size >= total:
                break
    else:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.sae import TrainingSAE

        from sae_vision_ext.training.distributed import DistributedSAETrainer, trainer_progress_bar_off

        torch.manual_seed(0)
        sae = TrainingSAE.from_dict(dict(architecture="topk", d_in=args.width, d_sae=4 * args.width, k=16))
        cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=args.batch_size, lr=1e-3,
                               lr_end=1e-3, feature_sampling_window=10**9)
        trainer = DistributedSAETrainer(cfg, sae, provider())
        with trainer_progress_bar_off():
            trainer.fit()
    if len(report) >= 2:
        first, last = report[0], report[-1]
        print(f"peak RSS ratio {last[0]:,} rows / {first[0]:,} rows: {last[1] / first[1]:.3f} "
              f"(+{last[1] - first[1]:.1f} MiB); {last[0] / last[3]:,.0f} rows/s")
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
