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

.PHONY: demo test lint bench clean venv fashion-data

# Fashion-MNIST (load_dataset("fashion")) is read from Debian's dataset-fashion-mnist package;
# install it where it is missing (the test suite does not need it: it keeps a 500-image subset).
FASHION_DIR := /usr/share/datasets/fashion-mnist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/flowprune demo --out runs/demo

fashion-data:
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "dataset-fashion-mnist unavailable (install it with: sudo apt-get install -y dataset-fashion-mnist): the tests on the full Fashion-MNIST set will skip"

test: $(STAMP) fashion-data
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium unavailable: the browser test will skip"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP) fashion-data
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
