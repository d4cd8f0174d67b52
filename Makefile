# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install torch==2.13.0 (CPU) first when torch is absent, because a
# bare `torch` requirement would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eep-installed

.PHONY: demo test setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eep demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
