# vastdet: `make demo` runs the main job, `make test` runs the test suite.
# Both start with `make setup`, which is idempotent and quick once done.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vastdet-setup
WORDNET_STAMP := $(VENV)/nltk_data/corpora/wordnet/lexnames
# torch + torchvision are pinned as a pair known to import together here; see README.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export DS_ACCELERATOR ?= cpu

.PHONY: setup test demo backbone lint format bench clean

setup: $(STAMP) $(WORDNET_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# `lvis` is LVIS's reference evaluator, the arbiter of `--protocol lvis` in the tests; it goes in
# without its declared dependencies (OpenCV, for drawing code the tests never load).
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev,tensorboard]"
	$(PY) -m pip install --quiet --no-deps "lvis==0.5.3"
	touch $@

# WordNet 3.0 for nltk, offline: Debian's package when there is no copy yet.
$(WORDNET_STAMP): | $(STAMP)
	$(PY) -m taxonomy.wordnet_data --dest $(VENV)/nltk_data

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: WordNet carnivores -> embeddings -> synthetic shards -> CQ-DINO stage 1 and 2 on a
# local Ray cluster (2 DeepSpeed workers) -> evaluation and charts, under runs/demo.
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m cluster.demo $(DEMO_ARGS)

# The shipped CPU backbone, retrained: vastdet/weights/resnet18_synth.safetensors and its record.
backbone: setup
	$(PY) -m vastdet.cli pretrain-backbone -o vastdet/weights/resnet18_synth.safetensors

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
