# Two commands for a newcomer:  make demo  |  make test
# Both create .venv on first use (torch from the pinned wheels, then mcvqa in editable mode).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## synthetic data -> tiny Qwen3-VL -> train -> predict -> evaluate, on CPU
	$(BIN)/mcvqa demo --out .

test: $(STAMP)  ## the test suite (CPU, tiny models, no network)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf data/synth models/tiny runs/demo .pytest_cache
