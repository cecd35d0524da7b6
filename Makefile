# The two commands a newcomer needs: `make demo` (the demo batch on SmolLM2-135M-Instruct) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m batchllm_lm_eval  # `lm_eval --model batchllm` (lm-eval 0.4 loads no plugins)
	touch $@

.PHONY: install demo test lint bench
install: $(BIN)/.installed

demo: install
	$(BIN)/python -m batchllm demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest
