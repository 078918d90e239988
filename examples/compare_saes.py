"""Compare SAE families on the same activations and write a report (tables + FVU-vs-L0 plot + stability).

Trains SAELens's TopK (several k), BatchTopK, Matryoshka BatchTopK and ReLU SAEs, the plugin's Matryoshka SAE
(uniform and reverse weighting, evaluated at many inference k and in ReLU mode), A-SAE and RA-SAE on one set
of rows, each once per seed (``--seeds``), evaluates every saved checkpoint on held-out rows and writes
``results.md`` / ``results.json`` / PNG plots into ``--output``: metrics as mean ± std over the seeds, at the
L0 each SAE really reaches (measured), and every family's FVU interpolated at the TopK SAEs' L0s. The flags
are those of ``sae-vision report`` (the fields of ``ReportConfig``).
"""

from __future__ import annotations

import sys

EPILOG = """examples:
  python examples/compare_saes.py --output report_tiny --tiny
  python examples/compare_saes.py --output report --data synthetic-sparse --stability-seeds 3
  python examples/compare_saes.py --output report --seeds 5 --weights-dir /tmp/report_saes
  python examples/compare_saes.py --output report_clip --data cache/hook_image_embed --key hook_image_embed \\
      --d-sae 4096 --topk-ks 16 32 64 --k 32 --msae-k-min 16 --n-candidates 16384
"""


def main(argv: list[str] | None = None) -> int:
    from sae_vision_ext.commands.report import report_config

    argv = sys.argv[1:] if argv is None else argv
    prog = "python examples/compare_saes.py"
    cfg, options = report_config(argv, prog=prog, description=__doc__, epilog=EPILOG)

    import json

    from sae_vision_ext.evals.report import run_report
    from sae_vision_ext.evals.report_markdown import MAIN_COLUMNS, markdown_table

    path = run_report(cfg, command=" ".join([prog, *argv]), progress=not options.quiet)
    payload = json.loads((path.parent / "results.json").read_text())
    keep = [c for c in MAIN_COLUMNS if c[0] in ("method", "k_inference", "l0", "fvu", "cosine", "cknna")]
    print(markdown_table(payload["summary"], keep, spread=True))  # mean ± std over the seeds
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
