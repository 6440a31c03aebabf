# `make run` and `make test` work on a fresh machine: both set everything up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)/services

.PHONY: setup run test lint proto bench intents clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m clawdbot.runner

lint: setup
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

test: setup lint
	$(PY) -m pytest

proto: setup
	$(PY) -m clawdbot.devtools.protogen
	$(PY) -m clawdbot.runner.envoy_config
	$(PY) -m clawdbot.devtools.k8s
	$(PY) -m clawdbot.devtools.compose
	$(PY) -m clawdbot.devtools.service_map --write

bench: setup
	@bash scripts/setup.sh wrk
	$(PY) -m clawdbot.devtools.bench
	$(PY) -m clawdbot.worker.bench_embeddings
	$(PY) -m clawdbot.worker.bench_local_models
	$(PY) -m clawdbot.devtools.bench_jobs

# Retrain the intent classifier from config/intents.yaml (a running worker picks the new
# version up on its next LoadModel, or at its next start).
intents: setup
	$(PY) -m clawdbot.worker.runtimes.intent_classifier train --dataset config/intents.yaml --out .clawdbot/models/intent-classifier

clean:
	rm -rf .clawdbot/run .pytest_cache .mypy_cache .ruff_cache
