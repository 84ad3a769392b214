"""vLLM prefill backend: vLLM computes the prompt, our KV connector hands its KV to our
block format so any of our decode backends continues the sequence. Imports vllm: load
only in an environment that has it (`.venv-vllm`)."""
