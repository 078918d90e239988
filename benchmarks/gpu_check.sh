#!/usr/bin/env bash
# The device check of issue 17 in one call (at most 8 minutes on a fresh H200 machine with no network):
#   1. find Python and CUDA; install what is missing from the wheels in .whl/ (`make gpu-wheels` downloads
#      them) into /tmp/site, with the project itself, all --no-deps; a stub stands in for wandb if absent;
#   2. with CUDA: the `cuda` tests (python -m pytest -m cuda); without: none (they need a GPU);
#   3. benchmarks/gpu_benchmarks.py: paper sizes on CUDA, tiny sizes without (a rehearsal), writing
#      $GPU_CHECK_OUT/gpu_results.json after every result, so a time-out still leaves what was measured.
# Everything printed also goes to $GPU_CHECK_OUT/gpu_check.log. Exit 0 when every step that ran passed.
#
#   bash benchmarks/gpu_check.sh                          # results in ./gpu-results
#   GPU_CHECK_OUT=/tmp/out GPU_CHECK_DEADLINE=300 bash benchmarks/gpu_check.sh
#
# Settings (environment): GPU_CHECK_OUT (./gpu-results), GPU_CHECK_DEADLINE (420: seconds for everything),
# GPU_CHECK_TEST_TIMEOUT (150: seconds for the cuda tests), PYTHON (./.venv/bin/python, else python, else
# python3), GPU_CHECK_WHEELS (.whl), GPU_CHECK_SITE (/tmp/site), GPU_BENCH_ARGS (extra benchmark flags).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
OUT=${GPU_CHECK_OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
DEADLINE=${GPU_CHECK_DEADLINE:-420}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-150}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
STUBS=$SITE-stubs
# imported by the tests or benchmarks and not part of the device's base image
NEEDED_MODULES=(sae_lens transformer_lens open_clip datasets pandas webdataset pytest sklearn)

remaining() { echo $((DEADLINE - SECONDS)); }
say() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*"; }

find_python() {  # $PYTHON if set, else the first of .venv/bin/python, python, python3 that has torch
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local candidate first=""
    for candidate in "$REPO/.venv/bin/python" python python3; do
        candidate=$(command -v "$candidate" 2>/dev/null) || continue
        first=${first:-$candidate}
        if "$candidate" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "${first:-python3}"
}

missing_modules() {  # the modules of NEEDED_MODULES (and wandb) that this Python cannot find
    "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' \
        "${NEEDED_MODULES[@]}" wandb sae_vision_ext
}

install_wheels() {  # the wheels of distributions this Python lacks, then the project, into $SITE (--no-deps)
    mkdir -p "$SITE"
    "$PY" - "$WHEELS" "$SITE" "$REPO" <<'EOF'
"""Install into SITE the wheels in WHEELS whose distribution this Python lacks (pip --no-index --no-deps,
or unzipped when pip is absent), then the project (pip --no-deps --no-build-isolation)."""
import importlib.metadata as md, pathlib, re, shutil, subprocess, sys, tempfile, zipfile

wheels, site, repo = (pathlib.Path(a) for a in sys.argv[1:4])
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
have = {norm(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
todo = []
for whl in sorted(wheels.glob("*.whl")):
    name = norm(whl.name.split("-")[0])
    (print(f"  present here, not installed: {whl.name}") if name in have else todo.append(whl))
pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
if todo and pip:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-conflicts",
                    "--disable-pip-version-check", "--quiet", "--target", str(site), *map(str, todo)], check=True)
elif todo:  # no pip: a wheel is a zip of the installed files (plus .data/purelib|platlib)
    for whl in todo:
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        for data in site.glob("*.data"):
            for sub in ("purelib", "platlib"):
                for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                    shutil.move(str(item), str(site / item.name))
            shutil.rmtree(data)
print(f"  installed {len(todo)} wheels into {site} ({'pip' if pip else 'unzipped'})")
# built from a copy, so that the build leaves nothing (build/, egg-info) in the repository
source = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_project_"))
shutil.copytree(repo / "sae_vision_ext", source / "sae_vision_ext", ignore=shutil.ignore_patterns("__pycache__"))
for name in ("pyproject.toml", "README.md"):
    shutil.copy(repo / name, source / name)
project = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)]
built = subprocess.run(project, capture_output=True, text=True) if pip else None
shutil.rmtree(source, ignore_errors=True)
ok = built is not None and built.returncode == 0
if built is not None and not ok:
    lines = (built.stdout + built.stderr).strip().splitlines()
    print("  " + next((line.strip() for line in lines if "error:" in line.lower()), lines[-1] if lines else ""))
print("  project installed" if ok else "  project NOT installed: the repository goes on PYTHONPATH instead")
sys.exit(0 if ok else 3)
EOF
}

write_wandb_stub() {  # imported (sae_lens, our runner) but never used with log_to_wandb=False
    mkdir -p "$STUBS/wandb"
    cat >"$STUBS/wandb/__init__.py" <<'EOF'
"""Stand-in for wandb written by benchmarks/gpu_check.sh: sae_lens and the runner import wandb at import time,
but the check never logs to it (log_to_wandb=False). Any use fails loudly."""
__version__ = "0+gpu-check-stub"


def __getattr__(name):
    raise AttributeError(f"wandb is a stub in the GPU check (benchmarks/gpu_check.sh): wandb.{name} is not available")
EOF
}

main() {
    say "repository $REPO, results in $OUT, deadline ${DEADLINE}s"
    PY=$(find_python)
    say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
    local cuda=0
    if command -v nvidia-smi >/dev/null 2>&1 || compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda)')
        say "torch: ${cuda#* }"
        cuda=${cuda%% *}
    fi  # else no NVIDIA driver: no GPU (and no need to import torch to know it)

    local missing pythonpath=""
    missing=$(missing_modules)
    if [ -n "$missing" ] && [ "$missing" != "wandb" ]; then
        say "not importable here: $missing"
        if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
            say "no wheels in $WHEELS: run 'make gpu-wheels' on a machine with network first"
            return 2
        fi
        local rc=0
        install_wheels || rc=$?
        [ "$rc" = 0 ] || [ "$rc" = 3 ] || return "$rc"
        pythonpath=$SITE
    fi
    # the repository last: the benchmarks import sae_vision_ext from it when it is not installed
    export PYTHONPATH="${pythonpath:+$pythonpath:}$STUBS${PYTHONPATH:+:$PYTHONPATH}:$REPO"
    if [ -n "$(missing_modules | tr ' ' '\n' | grep -x wandb || true)" ]; then
        write_wandb_stub
        say "wandb absent: a stub stands in for it ($STUBS/wandb)"
    fi
    missing=$(missing_modules)
    if [ -n "$missing" ]; then
        say "still not importable: $missing"
        return 2
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

    local tests_rc=none tests_line="not run"
    if [ "$cuda" = 1 ]; then
        local limit=$TEST_TIMEOUT
        [ "$(remaining)" -gt $((limit + 120)) ] || limit=$(($(remaining) - 120))
        [ "$limit" -ge 30 ] || limit=30
        say "CUDA tests: python -m pytest -m cuda (timeout ${limit}s)"
        tests_rc=0
        timeout --kill-after=10 "$limit" "$PY" -m pytest -m cuda -q -p no:cacheprovider -rfE \
            --continue-on-collection-errors --junitxml="$OUT/cuda_tests.xml" tests \
            2>&1 | tee "$OUT/cuda_tests.log" || tests_rc=${PIPESTATUS[0]}
        tests_line=$(grep -E "passed|failed|error|no tests ran" "$OUT/cuda_tests.log" | tail -1 || true)
        say "CUDA tests: exit $tests_rc: $tests_line"
    else
        say "no GPU found: CUDA tests not run, benchmarks at tiny size"
    fi

    local bench_rc=0 limit=$(($(remaining) - 10))
    say "benchmarks (timeout ${limit}s): python benchmarks/gpu_benchmarks.py --json $OUT/gpu_results.json"
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS holds several flags
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_benchmarks.py --json "$OUT/gpu_results.json" \
        --budget $((limit - 60 > 30 ? limit - 60 : 30)) --note "cuda_tests_exit=$tests_rc" \
        --note "cuda_tests=$tests_line" ${GPU_BENCH_ARGS:-} || bench_rc=$?
    say "benchmarks: exit $bench_rc; results: $OUT/gpu_results.json; log: $LOG"
    if [ "$bench_rc" != 0 ] || { [ "$tests_rc" != none ] && [ "$tests_rc" != 0 ]; }; then
        say "FAILED (cuda tests: $tests_rc, benchmarks: $bench_rc) after ${SECONDS}s"
        return 1
    fi
    say "done in ${SECONDS}s"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
