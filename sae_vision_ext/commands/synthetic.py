"""``sae-vision synthetic``: the report's SAE families on synthetic data with known atoms."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from sae_vision_ext.commands._common import (
    CONFIG_DEST,
    UserError,
    add_config,
    new_parser,
    one_line_errors,
    parse,
)
from sae_vision_ext.commands.report import preparse, run_report_command
from sae_vision_ext.evals.report_config import ReportConfig, synthetic_report_config
from sae_vision_ext.training.config import option

DESCRIPTION = """Identifiability and nested-k benchmarks on synthetic data with known atoms: sparse codes over
a random dictionary (--kind sparse) or coarse atoms refined by their children (--kind hierarchical). The SAE
sizes follow the ground truth (d_sae = the number of true atoms, k from the true sparsity); every report flag
overrides them. The defaults shown are those of the --kind and --tiny given (`sae-vision synthetic --kind
hierarchical --help`)."""

EPILOG = """examples:
  sae-vision synthetic --kind sparse --output synth_sparse --tiny
  sae-vision synthetic --kind sparse --output synth_sparse --n-atoms 128 --d-in 48 --true-k 6
  sae-vision synthetic --kind hierarchical --output synth_hier --stability-seeds 3

The output folder holds results.md (tables as mean ± std over --seeds runs, identifiability against the
true atoms with the perfect-dictionary and random-dictionary baselines, FVU at matched measured L0),
results.json, fvu_vs_l0.png and the trained SAE checkpoints (or those go to --weights-dir).
"""

# report fields that make no sense here: the command generates its own data
HIDE = ("data", "key", "labels")


@dataclass
class SyntheticOptions:
    """The synthetic data (its ground truth sizes the SAEs)."""

    kind: str = option(
        "sparse", choices=("sparse", "hierarchical"), help="sparse codes or coarse-to-fine atoms"
    )
    tiny: bool = option(False, help="tiny sizes (seconds; what the tests run): the defaults below change")
    d_in: int | None = option(None, help="data width (None: 32 sparse, 64 hierarchical; tiny 12 / 16)")
    n_atoms: int | None = option(None, help="sparse: number of true atoms (None: 64; tiny 16)")
    n_coarse: int | None = option(None, help="hierarchical: number of coarse atoms (None: 32; tiny 6)")
    n_fine: int | None = option(None, help="hierarchical: children per coarse atom (None: 4; tiny 2)")
    true_k: int | None = option(
        None,
        help="active true atoms per row (sparse; None: 4, tiny 2) or active "
        "coarse atoms per row (hierarchical; None: 3, tiny 2)",
    )
    quiet: bool = option(False, help="no progress bar")


def _sizing(options: SyntheticOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(options).items() if k != "quiet"}


def build_parser(argv: Sequence[str] = (), defaults: ReportConfig | None = None):
    parser = new_parser("sae-vision synthetic", DESCRIPTION, EPILOG, hidden=HIDE)
    parser.add_arguments(SyntheticOptions, dest="options")
    if defaults is None:
        defaults = synthetic_report_config(**_sizing(preparse(SyntheticOptions, argv)))
    add_config(parser, ReportConfig, defaults=defaults)
    return parser


def synthetic_config(argv: Sequence[str]) -> tuple[ReportConfig, SyntheticOptions]:
    """``(config, options)`` from the command line: sizes from the ground truth, the flags that change them on
    top (a new ``--d-sae`` also resizes the k-means candidates)."""
    defaults = synthetic_report_config(**_sizing(preparse(SyntheticOptions, argv)))
    args = parse(build_parser(argv, defaults), argv)
    parsed = getattr(args, CONFIG_DEST)
    flags = [f.name for f in dataclasses.fields(ReportConfig) if f.metadata.get("cmd", True)]
    changed = {n: getattr(parsed, n) for n in flags if getattr(parsed, n) != getattr(defaults, n)}
    if set(HIDE) & set(changed):
        raise UserError("sae-vision synthetic generates its own data; `sae-vision report --data` reads files")
    cfg = synthetic_report_config(**_sizing(args.options), **changed)
    cfg.stability = cfg.stability_seeds >= 2
    return cfg, args.options


@one_line_errors("synthetic")
def main(argv: Sequence[str] | None = None) -> int:
    return run_report_command("synthetic", argv, synthetic_config)
