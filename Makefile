# flowprune: two commands do everything on a fresh machine.
#   make demo   -- create .venv, install flowprune, run the pipeline on the embedded MNIST digits
#   make test   -- create .venv, install flowprune with its test extras, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned in the same pip command as everything else: torch 2.14.1 / torchvision 0.29.1
# install from this machine's local wheel cache; the resolver must not pick another build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.flowprune-installed

.PHONY: demo test lint bench clean venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/flowprune demo --out runs/demo

test: $(STAMP)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium unavailable: the browser test will skip"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
