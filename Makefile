# loadproof: every entry point. The first run of any target sets up what it needs
# (system packages via .ci/system-deps, Python packages into .venv from requirements.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STACK ?= dev
PROFILE ?=
# Empty: the stack file's loadtest.profile; PROFILE=smoke|demo|cold|step|step-cold|flow|seed overrides it.
PROFILE_ARG = $(if $(PROFILE),--profile $(PROFILE))
export PYTHONPATH := $(CURDIR)

.PHONY: help deps system-deps serve demo compare bench profile chaos test lint typecheck manifests frontpage clean

help:
	@echo "make demo      - the whole proof on this machine (local stack, k6, measured report; PROFILE=smoke|demo|cold|step|step-cold|flow|seed)"
	@echo "make test      - every test (real Postgres, Redis, Prometheus, k6)"
	@echo "make serve     - run the service locally on 127.0.0.1:8080 until Ctrl-C"
	@echo "make compare   - baseline vs optimized, same workload, one run"
	@echo "make bench     - highest sustainable arrival rate vs bare reference endpoints"
	@echo "make profile   - py-spy: the API's CPU per request by library, hot and cold paths"
	@echo "make chaos     - fault campaign under steady load (kills, outages, LLM faults, overload, abuse) -> CHAOS.md"
	@echo "make manifests - render and validate the Kubernetes manifests offline (STACK=$(STACK))"
	@echo "make lint      - ruff and pyright"
	@echo "make frontpage - copy the committed PERFORMANCE.md and docs/demo-output.txt into README.md"

system-deps:
	@./.ci/system-deps

$(VENV)/.installed: requirements.txt
	@# a working venv is updated in place; a missing or broken one (e.g. made by another python) is made anew
	@$(PY) -c 'import binascii' 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

deps: system-deps $(VENV)/.installed

serve: deps
	$(PY) -m localstack.serve

demo: deps
	$(PY) -m loadtest.demo --stack $(STACK) $(PROFILE_ARG)

compare: deps
	$(PY) -m loadtest.compare --stack $(STACK) $(PROFILE_ARG)

bench: deps
	$(PY) -m loadtest.bench --stack $(STACK)

profile: deps
	$(PY) -m loadtest.profile --stack $(STACK)

chaos: deps
	$(PY) -m loadtest.chaos

manifests: deps
	$(PY) -m infra.render --stack $(STACK)

# Python only: regenerating text needs no system packages.
frontpage: $(VENV)/.installed
	$(PY) -m loadtest.frontpage

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

test: deps lint
	$(PY) -m pytest -q

clean:
	rm -rf build reports .pytest_cache
