# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install torch==2.13.0 (CPU) first when torch is absent, because a
# bare `torch` requirement would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eep-installed

.PHONY: demo test setup clean test-sglang

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eep demo

test: $(STAMP)
	$(PY) -m pytest -q

# The optional SGLang group: its own venv (.venv-sglang, sglang 0.5.23 --no-deps beside torch 2.13 CPU),
# set up idempotently by tests/sglang/setup_env.sh; see docs/integrations.md.
test-sglang:
	bash tests/sglang/setup_env.sh
	.venv-sglang/bin/python -m pytest -q tests/sglang

clean:
	rm -rf $(VENV) .venv-sglang *.egg-info .pytest_cache .hypothesis
