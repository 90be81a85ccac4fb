# raylign: `make install`, `make test`, `make lint`. See README.md.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test test-unit test-integration lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

install:  ## create .venv and install raylign with the vLLM build for this machine (idempotent)
	@bash scripts/install.sh

test: install  ## the whole suite: unit tests, then integration tests (local Ray, real vLLM and DeepSpeed)
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: install  ## unit tests only (no Ray, seconds)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

test-integration: install  ## integration tests only
	$(PY) -m pytest tests/integration -q -p no:cacheprovider

lint: install  ## ruff, and the import rules of STYLE.md (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:  ## remove the venv and caches (runs/ is kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
