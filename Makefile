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

bench:  ## the standard benchmarks (several minutes); figures go to docs/BENCHMARKS.md with the machine
	$(PY) benchmarks/bench_simulate.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_codecs.py
	$(PY) benchmarks/bench_epie.py speed
	$(PY) benchmarks/bench_pipeline.py --only efficiency

lint:  ## ruff
	$(PY) -m ruff check edgeptycho tests benchmarks
