# Reflector: `make demo` and `make test` set up everything they need on a fresh Debian 12 host.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: deps demo test test-unit test-system lint bench fuzz dist clean vagrant-test

deps:
	@bash .ci/deps.sh

demo: deps
	@$(PY) -m reflector.demo

test: deps
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

test-unit: deps
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests/unit

test-system: deps
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests/system

lint: deps
	$(VENV)/bin/ruff check reflector tests benchmarks
	$(VENV)/bin/mypy
	cd ansible && ansible-lint --offline -q

bench: deps
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# Firewall choreography on three LXC machines (Vagrant); builds or reuses the box, always destroys.
vagrant-test: deps
	bash vagrant/run-tests.sh $(PYTEST_ARGS)

FUZZ_SECONDS ?= 300
fuzz: deps
	$(PY) tests/fuzz/run_atheris.py --all --seconds $(FUZZ_SECONDS) --jobs 2 $(FUZZ_ARGS)

dist: deps
	@bash .ci/build-binary.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache test-artifacts dist build
