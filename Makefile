# edgeptycho — common tasks. `make help` lists them.
PY ?= python3
OUT ?= out

.PHONY: help install test test-fast demo bench lint format

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## install edgeptycho with the dev and training extras (CPU torch wheel)
	$(PY) -m pip install -e ".[dev]"

test: install  ## full test suite (what CI runs)
	$(PY) -m pytest

test-fast:  ## tests without the slow marker
	$(PY) -m pytest -m "not slow"

demo: install  ## simulate a Siemens-star scan and stream it through the CPU backend
	edgeptycho demo --out $(OUT)/demo

bench:  ## benchmarks; results go to docs/BENCHMARKS.md by hand, with the machine
	$(PY) benchmarks/run_all.py

lint:  ## ruff
	$(PY) -m ruff check edgeptycho tests benchmarks
