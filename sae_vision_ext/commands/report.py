"""``sae-vision report``: train SAE families on the same rows and write a comparison report."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sae_vision_ext.commands._common import CONFIG_DEST, add_config, new_parser, one_line_errors, parse
from sae_vision_ext.evals.report_config import ReportConfig
from sae_vision_ext.training.config import option

DESCRIPTION = """Train SAELens TopK / BatchTopK / Matryoshka BatchTopK / ReLU, MSAE (uniform and reverse
weighting), A-SAE and RA-SAE on the same activation rows (synthetic data by default, or a file / activation
cache with --data), each once per seed (--seeds), evaluate every saved checkpoint on held-out rows and write
results.md, results.json and PNG plots (FVU against the measured L0, stability) into --output. Metrics are
mean ± std over the seeds at the L0 each SAE really reaches, and every family's FVU is interpolated at the
TopK SAEs' L0s (matched L0; never extrapolated). Every flag is a field of ReportConfig; --tiny switches
every default to the test sizes (run `sae-vision report --tiny --help` to see them)."""

EPILOG = """examples:
  sae-vision report --output report_tiny --tiny
  sae-vision report --output report --data synthetic-hierarchical
  sae-vision report --output report --seeds 5 --weights-dir /tmp/report_saes
  sae-vision report --output report_clip --data cache/hook_image_embed --key hook_image_embed \\
      --d-sae 4096 --topk-ks 16 32 64 --k 32 --msae-k-min 16 --n-candidates 16384
"""


@dataclass
class ReportOptions:
    """Preset and progress."""

    tiny: bool = option(False, help="tiny sizes (seconds; what the tests run): the defaults below change")
    quiet: bool = option(False, help="no progress bar")


def preparse(cls: type, argv: Sequence[str]) -> Any:
    """The ``cls`` dataclass as the command line sets it, read before the parser is built because its fields
    decide the defaults of the others (and so what ``--help`` shows). Mistakes are left for the full parser to
    report."""
    pre = new_parser("", "")
    pre.allow_abbrev = False  # "--k" is the report's own flag, not "--kind"
    add_config(pre, cls, dest="pre")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return pre.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].pre
    except SystemExit:
        return cls()


def _defaults(argv: Sequence[str]) -> ReportConfig:
    return ReportConfig.tiny() if preparse(ReportOptions, argv).tiny else ReportConfig()


def build_parser(
    argv: Sequence[str] = (),
    prog: str = "sae-vision report",
    description: str = DESCRIPTION,
    epilog: str = EPILOG,
    defaults: ReportConfig | None = None,
):
    parser = new_parser(prog, description, epilog)
    parser.add_arguments(ReportOptions, dest="options")
    add_config(parser, ReportConfig, defaults=defaults or _defaults(argv))
    return parser


def report_config(argv: Sequence[str], **parser_kwargs: Any) -> tuple[ReportConfig, ReportOptions]:
    """``(config, options)`` from the command line (``parser_kwargs``: prog, description, epilog)."""
    defaults = _defaults(argv)
    args = parse(build_parser(argv, defaults=defaults, **parser_kwargs), argv)
    cfg: ReportConfig = getattr(args, CONFIG_DEST)
    # the fields that are not flags come from the preset
    cfg = dataclasses.replace(
        cfg, synthetic_kwargs=defaults.synthetic_kwargs, stability=cfg.stability_seeds >= 2
    )
    return cfg, args.options


def run_report_command(
    command: str, argv: Sequence[str] | None, read_config: Callable[[Sequence[str]], tuple[ReportConfig, Any]]
) -> int:
    """Run a report from the command line: ``read_config(argv) -> (config, options with .quiet)``; the main of
    both ``sae-vision report`` and ``sae-vision synthetic``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, options = read_config(argv)
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.evals.report import run_report

    path = run_report(cfg, command=f"sae-vision {command} " + " ".join(argv), progress=not options.quiet)
    print(f"wrote {path}")
    return 0


@one_line_errors("report")
def main(argv: Sequence[str] | None = None) -> int:
    return run_report_command("report", argv, report_config)
