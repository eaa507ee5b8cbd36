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
# Every package but torch (and what only torch needs) is pinned with hashes here;
# `make lock` regenerates both locks (scripts/lock.py, docs/security-audit.md).
LOCK := requirements-dev.lock
LOCK_FLAGS ?=
# Lock and audit tools live in their own venv, so they never mix into the locked one.
TOOLS ?= .venv-tools
TOOLS_SPEC ?= uv==0.13.10 pip-audit==2.10.1
# Vulnerability ids accepted after review; each has a row with its reason in docs/security-audit.md.
AUDIT_IGNORE ?=

.PHONY: venv demo test lint bench clean lock audit

# torch first (the build TORCH_SPEC/TORCH_INDEX pick), then the hashed lock, then the
# package itself without dependencies or build isolation: nothing else is resolved.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_EXTRA) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(PIP_EXTRA) --require-hashes -r $(LOCK)
	$(BIN)/pip install -q $(PIP_EXTRA) --no-deps --no-build-isolation -e .
	$(BIN)/pip check
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

$(TOOLS)/.installed:
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q $(TOOLS_SPEC)
	touch $@

# Regenerate requirements.lock and requirements-dev.lock from pyproject.toml (needs PyPI);
# LOCK_FLAGS="--upgrade" or "--upgrade-package NAME" moves pins.
lock: $(TOOLS)/.installed
	$(TOOLS)/bin/python -m scripts.lock --uv $(TOOLS)/bin/uv --torch "$(TORCH_SPEC)" $(LOCK_FLAGS)

# Known vulnerabilities in the locked versions and torch (needs a vulnerability database:
# a connected machine; not part of `make test`). --strict fails if any package went unchecked.
audit: $(TOOLS)/.installed
	mkdir -p build
	echo "$(TORCH_SPEC)" | sed 's/+[A-Za-z0-9.]*//' > build/audit-torch.txt
	$(TOOLS)/bin/pip-audit --strict --disable-pip --require-hashes -r requirements.lock $(AUDIT_IGNORE:%=--ignore-vuln %)
	$(TOOLS)/bin/pip-audit --strict --disable-pip --require-hashes -r requirements-dev.lock $(AUDIT_IGNORE:%=--ignore-vuln %)
	$(TOOLS)/bin/pip-audit --strict --disable-pip --no-deps -r build/audit-torch.txt $(AUDIT_IGNORE:%=--ignore-vuln %)

clean:
	rm -rf $(VENV) $(TOOLS) demo-data .pytest_cache
