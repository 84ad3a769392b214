"""What structured output costs: output tokens/s at each concurrency with every request's
output constrained by a JSON schema vs unconstrained, on one server, runs interleaved
(on, off, off, on, ...) so a shared machine's drift hits both.

    PYTHONPATH=. .venv/bin/python benchmarks/structured_overhead.py --out results/structured

`benchmarks/logprobs_overhead.py`'s runner with `--extra-body '{"structured_outputs":
{"json": SCHEMA}}'`: `inferos bench` (completions, ignore_eos, --output-len tokens each).
The schema asks for an object holding a list of at least 256 short strings, so every
constrained answer runs to --output-len as the unconstrained ones do (a grammar that
completed would end the answer early) and every token is masked. Every request sends the
same schema, as a JSON-producing app does: after the warm-up run it is a cache hit on
every replica (the first request with a new schema pays the compile and llguidance's
lazily built lexer; not measured here). Reports CPU time per output token too (server
process tree and client apart), which drifts far less than tokens/s on a shared box.
"""

from __future__ import annotations

import json

from benchmarks.logprobs_overhead import overhead_parser, run_overhead

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 12},
            "minItems": 256,
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


def main() -> int:
    p = overhead_parser(__doc__, "results/structured_overhead")
    args = p.parse_args()
    print(f"schema: {json.dumps(SCHEMA)}", flush=True)
    run_overhead(args, {"structured_outputs": {"json": SCHEMA}}, "structured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
