# raylign: `make install`, `make test`, `make lint`. See README.md.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install run test test-unit test-integration lint clean sweep

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

install:  ## create .venv and install raylign with the vLLM build for this machine (idempotent)
	@bash scripts/install.sh

run: install  ## the default pipeline (configs/tiny_irl.yaml) on CPU: progress per stage, last line the run dir
	$(VENV)/bin/raylign run configs/tiny_irl.yaml

test: install  ## the whole suite: unit tests, then integration tests (local Ray, real vLLM and DeepSpeed)
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25

test-unit: install  ## unit tests only (no Ray, seconds)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

test-integration: install  ## integration tests only
	$(PY) -m pytest tests/integration -q -p no:cacheprovider

sweep: install  ## the 4-trial KL sweep on the tiny CPU task (configs/sweep_kl.yaml); prints the sweep dir
	$(VENV)/bin/raylign sweep configs/sweep_kl.yaml

lint: install  ## ruff check, ruff format --check, mypy, and the import rules of STYLE.md (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:  ## remove the venv and caches (runs/ is kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

.PHONY: cluster-up cluster-down
RAY_HEAD_DIR ?= /tmp/raylign-head
RAY_PORT ?= 6379
RAY_DASHBOARD_PORT ?= 8265

cluster-up: install  ## start a local Ray head on 127.0.0.1 with token auth (jobs: http://127.0.0.1:8265)
	$(PY) -m cluster.local up --temp-dir $(RAY_HEAD_DIR) --port $(RAY_PORT) --dashboard-port $(RAY_DASHBOARD_PORT)

cluster-down:  ## stop the local Ray head of cluster-up (only that one: never `ray stop`)
	$(PY) -m cluster.local down --temp-dir $(RAY_HEAD_DIR)

.PHONY: bench
bench: install  ## benchmarks, not part of `make test` (~25 min): vs TRL, rollout, step time, sync, memory; README table
	$(PY) -m benchmarks.run
