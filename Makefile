# The two commands a newcomer needs:  `make demo` (run the main job on the embedded tiny model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test lint bench
install: $(BIN)/.installed

demo: install
	$(BIN)/python -m batchllm demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest
