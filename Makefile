# Two commands for a newcomer:  make demo  |  make test
# Both create .venv on first use (torch, then mcvqa in editable mode with its test extra).
#
# torch: any release in TORCH_SPEC. Where no NVIDIA GPU is visible, the CPU-only build is asked for first
# from TORCH_CPU_INDEX (PyTorch's CPU wheel index: ~200 MB instead of ~6 GB of CUDA libraries); if that index
# cannot be reached, pip's usual index serves whatever build it has. Override either, e.g.
#   make test TORCH_CPU_INDEX=            # never use the CPU index
#   make test TORCH_SPEC='torch==2.9.1 torchvision==0.24.1'
# The line after the install prints which torch and torchvision builds the venv holds.
PYTHON          ?= python3
VENV            := .venv
BIN             := $(VENV)/bin
STAMP           := $(VENV)/.installed
TORCH_SPEC      ?= "torch>=2.4" torchvision
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU         := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
PYTEST_ARGS     ?=
# The low end of the supported transformers range (src/mcvqa/compat.py, pyproject.toml), laid over .venv as a
# --target folder with the huggingface-hub range it needs; the core suite then runs on it (make test-oldest).
TRANSFORMERS_OLDEST ?= 5.17.0
OLDEST          := .venv-oldest
CORE_TESTS      := tests/test_data.py tests/test_scoring.py tests/test_predict.py tests/test_train.py tests/test_reliability.py \
                   tests/test_real_files.py tests/test_families.py tests/test_quant.py tests/test_stack.py

.PHONY: demo test test-oldest install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# --isolated: only the CPU index, none of pip's configured extra indexes or wheel folders, so torch and
	@# torchvision come from one place and match; then check they load together before trusting them.
	@if [ -z "$(HAS_GPU)" ] && [ -n "$(TORCH_CPU_INDEX)" ] && \
	    $(BIN)/python -m pip install -q --isolated --retries 1 --timeout 15 --index-url $(TORCH_CPU_INDEX) $(TORCH_SPEC) 2>/dev/null && \
	    $(BIN)/python -c "import torch, torchvision.ops" 2>/dev/null; then \
	  true; \
	else \
	  [ -n "$(HAS_GPU)" ] || [ -z "$(TORCH_CPU_INDEX)" ] || echo "torch: $(TORCH_CPU_INDEX) not reachable; installing from the default index"; \
	  $(BIN)/python -m pip install -q $(TORCH_SPEC); \
	fi
	$(BIN)/python -c "import torch, torchvision.ops; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## synthetic data -> tiny Qwen3-VL -> train -> predict -> evaluate, on CPU
	$(BIN)/mcvqa demo --out .

test: $(STAMP)  ## the test suite (CPU, tiny models, no network)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(OLDEST)/.installed-$(TRANSFORMERS_OLDEST): $(STAMP)
	rm -rf $(OLDEST)
	$(BIN)/python -m pip install -q --target $(OLDEST) --no-deps "transformers==$(TRANSFORMERS_OLDEST)"
	$(BIN)/python -m pip install -q --target $(OLDEST) "huggingface-hub>=1.5,<2"
	touch $@

test-oldest: $(OLDEST)/.installed-$(TRANSFORMERS_OLDEST)  ## the core suite on the oldest supported transformers
	PYTHONPATH=$(OLDEST) $(BIN)/python -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=$(OLDEST) $(BIN)/python -m pytest -q $(CORE_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf data/synth models/tiny runs/demo .pytest_cache $(OLDEST)
