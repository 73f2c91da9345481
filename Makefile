# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv with pip (torch first, from the local CPU wheel when present) and reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fearec_dist demo

test: $(STAMP)
	$(BIN)/ruff check fearec_dist tests bench jobs
	$(BIN)/python -m pytest -q --durations=12 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check fearec_dist tests bench jobs
	$(BIN)/ruff format --check fearec_dist tests bench jobs

clean:
	rm -rf $(VENV) runs .pytest_cache
