# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, run the main job (quickstart)
#   make test   - create .venv, install, run the default test suite
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test test-slow lint bench chromium

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
