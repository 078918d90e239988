# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, run the main job (quickstart)
#   make test   - create .venv, install, run the default test suite
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test test-slow lint bench chromium gpu-wheels

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install -c constraints.txt --no-deps overcomplete  # see pyproject.toml's dev extra
	touch $@

demo: .venv/.installed
	$(PY) -m sae_vision_ext.quickstart --overwrite   # the demo's folder is scratch: re-running replaces it

# The dashboard tests open the page in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: .venv/.installed chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: .venv/.installed chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

lint: .venv/.installed
	$(PY) -m ruff check sae_vision_ext tests examples benchmarks scripts
	.venv/bin/lint-imports

bench: .venv/.installed
	for b in benchmarks/*.py; do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

# Wheels for `bash benchmarks/gpu_check.sh` on a device machine that has torch, torchvision, timm, transformers,
# numpy, scipy, safetensors, pyarrow, huggingface_hub, tqdm and matplotlib but no network: exactly what importing
# sae_lens, sae_vision_ext, the test modules and benchmarks/gpu_benchmarks.py needs on top of those (found with
# `python -X importtime` and checked on a replica of that machine, one package left out at a time; see
# docs/notes/issue-17.md). Not here: wandb (imported by sae_lens and the runner, never used by the check:
# gpu_check.sh puts a stub in its place) and what nothing imports (rich's markdown-it-py, transformer-lens's
# typeguard, jaxtyping's wadler-lindig). The extra manylinux tags admit wheels built for glibc 2.24-2.28
# (pandas, scikit-learn); the device's torch needs glibc 2.28 anyway. `make gpu-wheels WHEEL_PYTHON=3.11
# WHEEL_DIR=...` fetches the same set for another Python.
WHEEL_DIR ?= .whl
WHEEL_PYTHON ?= 3.12
# any pip will do: it only downloads
WHEEL_PIP ?= python3 -m pip
GPU_WHEELS := \
	sae-lens==6.54.12 transformer-lens==3.9.0 open-clip-torch==3.3.0 datasets==5.2.0 \
	pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
	requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3 certifi==2026.10.19.post1 \
	simple-parsing==0.1.9 docstring-parser==0.18.0 einops==0.8.2 jaxtyping==0.3.11 better-abc==0.0.3 \
	rich==15.0.0 pygments==2.21.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 \
	pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
	scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 cloudpickle==3.1.3 narwhals==2.29.0

gpu-wheels:
	mkdir -p $(WHEEL_DIR)
	$(WHEEL_PIP) download --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) \
		--platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(WHEEL_DIR) $(GPU_WHEELS)
	@du -ch $(WHEEL_DIR)/*.whl | tail -1
