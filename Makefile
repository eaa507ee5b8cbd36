# Two entry points: `make demo` (main job) and `make test` (whole suite).
# Both create or reuse .venv inside the repository.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; on a GPU host e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.clinfuse-installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_EXTRA) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(PIP_EXTRA) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/clinfuse demo --out demo-data

test: $(STAMP)
	$(BIN)/python -m scripts.run_tests

lint: $(STAMP)
	$(BIN)/ruff check fhir_adapters pipelines models audits services tests benchmarks scripts
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) demo-data .pytest_cache
