"""Compare SAE families on the same activations and write a report (tables + FVU-vs-L0 plot + stability).

Trains SAELens's TopK (several k), BatchTopK and ReLU SAEs, the plugin's Matryoshka SAE (uniform and reverse
weighting, evaluated at many inference k), A-SAE and RA-SAE on one set of rows, evaluates every saved checkpoint
on held-out rows and writes ``results.md`` / ``results.json`` / PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  python examples/compare_saes.py --out report_tiny --tiny
  python examples/compare_saes.py --out report --data synthetic-sparse --stability-seeds 3
  python examples/compare_saes.py --out report_clip --data cache/hook_image_embed --key hook_image_embed \\
      --d-sae 4096 --topk-ks 16 32 64 --k 32 --msae-k-min 16 --n-candidates 16384
"""


def main(argv: list[str] | None = None) -> int:
    from sae_vision_ext.evals.report import (
        MAIN_COLUMNS,
        add_report_arguments,
        config_from_args,
        markdown_table,
        run_report,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    path = run_report(cfg, command="python examples/compare_saes.py " + " ".join(argv or sys.argv[1:]))

    import json

    payload = json.loads((path.parent / "results.json").read_text())
    keep = [c for c in MAIN_COLUMNS if c[0] in ("method", "k_inference", "l0", "fvu", "cosine", "cknna")]
    print(markdown_table(payload["results"], keep))
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
