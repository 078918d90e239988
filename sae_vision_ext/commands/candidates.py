"""``sae-vision candidates``: k-means archetype candidates from activation rows (for ra_sae / a_sae)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass

from sae_vision_ext.commands._common import CONFIG_DEST, add_config, new_parser, one_line_errors, parse
from sae_vision_ext.training.config import option

DESCRIPTION = """Streaming k-means (faiss) over activation rows, with element-wise standardisation, written as
a candidates file for the archetypal SAEs (Fel et al. 2025): one pass for exact statistics and a uniform
sample, k-means on the sample, then optional full Lloyd passes over every row."""

EPILOG = """examples:
  sae-vision candidates runs/cache_l11 --hook blocks.11.hook_resid_post --n-candidates 32000 \\
      --output candidates.safetensors
  sae-vision candidates rows.npy --n-candidates 1024 --output candidates.safetensors --refine-passes 1

Then point an archetypal SAE config at the file:
  RASAETrainingSAEConfig(..., candidates_path="candidates.safetensors"), or
  sae-vision train --architecture ra_sae --sae candidates_path=candidates.safetensors ...
"""


@dataclass
class CandidatesConfig:
    """The rows, the k-means and the output file."""

    source: str = option(MISSING, positional=True, metavar="SOURCE",
                         help="activation cache folder, .npy or .safetensors rows")  # fmt: skip
    output_path: str = option(MISSING, "--output", help="output candidates file (.safetensors)")
    n_candidates: int = option(32000, help="number of centroids (paper: 32000)")
    hook_name: str | None = option(None, "--hook", help="column of the cache / key of the .safetensors file")
    standardize: bool = option(True, negative_option="--no-standardize",
                               help="cluster standardised rows, as the paper (or raw rows)")  # fmt: skip
    niter: int = option(20, help="k-means iterations on the sample")
    sample_rows: int | None = option(None, help="rows kept in memory (None: 64 x --n-candidates)")
    refine_passes: int = option(0, help="full Lloyd passes over every row")
    seed: int = option(0, help="seed of the sample and the k-means")
    max_rows: int | None = option(None, help="read at most this many rows (None: all)")
    chunk_rows: int = option(65536, help="rows read per chunk")
    kmeans_init: str = option("auto", choices=("auto", "kmeans++", "random"),
                              help="auto: k-means++ seeding up to 4096 centroids, random above")  # fmt: skip
    verbose: bool = option(False, help="print faiss's k-means iterations")
    quiet: bool = option(False, help="no progress bars")


def build_parser(argv: Sequence[str] = ()):
    parser = new_parser("sae-vision candidates", DESCRIPTION, EPILOG)
    add_config(parser, CandidatesConfig)
    return parser


@one_line_errors("candidates")
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg: CandidatesConfig = getattr(parse(build_parser(argv), argv), CONFIG_DEST)
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.activations.rows import open_row_source
    from sae_vision_ext.training.candidates import compute_candidates

    source = open_row_source(cfg.source, hook_name=cfg.hook_name, chunk_rows=cfg.chunk_rows)
    result = compute_candidates(
        source,
        cfg.n_candidates,
        standardize=cfg.standardize,
        n_iter=cfg.niter,
        sample_rows=cfg.sample_rows,
        refine_passes=cfg.refine_passes,
        seed=cfg.seed,
        max_rows=cfg.max_rows,
        kmeans_init=cfg.kmeans_init,
        verbose=cfg.verbose,
        progress=not cfg.quiet,
    )
    result.metadata["source"] = str(cfg.source)
    if cfg.hook_name:
        result.metadata["hook_name"] = cfg.hook_name
    out = result.save(cfg.output_path)
    m = result.metadata
    print(f"wrote {m['n_candidates']} candidates (d={m['d']}) from {m['n_rows']} rows to {out} "
          f"in {m['seconds']['total']:.1f}s ({m['rows_per_second']:.0f} rows/s)")  # fmt: skip
    return 0
