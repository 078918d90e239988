"""How fast ``sae-vision --help`` and every ``sae-vision COMMAND --help`` answer, against ``python -c pass``.

Each variant is a fresh Python process (what a user waits for), run ``--repeats`` times in a shuffled
interleaved order so machine load drifts hit all of them alike; reported as the median wall time, its ratio to
a bare Python start, and whether the command imported torch or SAELens (it must not: heavy imports wait until
work starts). The target (issue 13) is under 1.5 s for every command.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time

from sae_vision_ext.cli import SUBCOMMANDS

EPILOG = """examples:
  python benchmarks/cli_startup.py
  python benchmarks/cli_startup.py --repeats 3          # quick look
"""

PROBE = ("import sys, runpy; sys.argv = ['sae-vision', *{argv!r}]\n"
         "try:\n    runpy.run_module('sae_vision_ext.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('HEAVY', 'torch' in sys.modules, 'sae_lens' in sys.modules, file=sys.stderr)")  # fmt: skip


def timed(code: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return time.perf_counter() - started, done.stderr if done.returncode == 0 else "HEAVY failed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    variants = {"python -c pass": "pass", "sae-vision --help": PROBE.format(argv=["--help"])}
    variants.update(
        {f"sae-vision {name} --help": PROBE.format(argv=[name, "--help"]) for name in SUBCOMMANDS}
    )
    times: dict[str, list[float]] = {name: [] for name in variants}
    heavy: dict[str, str] = {}
    order = [name for name in variants for _ in range(args.repeats)]
    random.Random(0).shuffle(order)
    for name in order:
        seconds, err = timed(variants[name])
        times[name].append(seconds)
        heavy[name] = err.rsplit("HEAVY", 1)[-1].strip() if "HEAVY" in err else "-"
    base = statistics.median(times["python -c pass"])
    print(f"{'command':<36} {'median s':>9} {'x python':>9}  imports torch / sae_lens")
    worst = 0.0
    for name, values in times.items():
        median = statistics.median(values)
        if name != "python -c pass":
            worst = max(worst, median)
        print(f"{name:<36} {median:9.3f} {median / base:9.1f}  {heavy[name]}")
    print(f"slowest --help: {worst:.3f} s ({worst / base:.1f}x a bare Python start); target < 1.5 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
