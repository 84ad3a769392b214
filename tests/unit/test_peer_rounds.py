"""`peer_bench.py --rounds`: servers alternate their order by round, numbers are medians over
rounds and ratios are paired within a round (`benchmarks/peer_rounds.py`), and the markdown
says so; a report from before rounds reads as one round."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_bench  # noqa: E402
import peer_rounds  # noqa: E402


def _side(tok_s: dict[int, float | None]) -> dict:
    runs = {
        str(c): {"num_prompts": 4, "result": None if v is None else {"output_throughput": v}}
        for c, v in tok_s.items()
    }
    return {"base_url": "http://x", "runs": runs}


def _report(rounds: list[dict[str, dict[int, float | None]]]) -> dict:
    return {
        "config": {
            "concurrency": [1, 32],
            "input_len": 128,
            "output_len": 128,
            "temperature": 0.0,
            "seed": 0,
            "min_prompts": 6,
            "prompts_per_client": 3,
            "num_prompts": None,
            "warmup_prompts": 4,
        },
        "machine": {"cpus": 2},
        "started_at": "t0",
        "finished_at": "t1",
        "loadavg_start": [0.0, 0.0, 0.0],
        "rounds": [
            {
                "order": peer_rounds.round_order(list(r), i),
                "servers": {name: _side(v) for name, v in r.items()},
            }
            for i, r in enumerate(rounds)
        ],
    }


def test_order_alternates_so_each_server_goes_first_as_often() -> None:
    names = ["ours", "vllm", "llama"]
    assert peer_rounds.round_order(names, 0) == names
    assert peer_rounds.round_order(names, 1) == ["llama", "vllm", "ours"]
    assert peer_rounds.round_order(names, 2) == names


def test_ratios_are_paired_within_rounds_and_numbers_are_medians() -> None:
    # the machine got faster between rounds: the paired ratios are 1.5 and 1.25
    report = _report(
        [
            {"ours": {1: 60.0, 32: 300.0}, "vllm": {1: 30.0, 32: 200.0}},
            {"ours": {1: 90.0, 32: 500.0}, "vllm": {1: 30.0, 32: 400.0}},
        ]
    )
    assert peer_rounds.median_value(report, "ours", 32, "output_throughput") == 400.0
    assert peer_rounds.round_ratios(report, "vllm", 32, "output_throughput") == [1.5, 1.25]
    assert peer_rounds.paired_ratio(report, "vllm", 32, "output_throughput") == 1.375
    assert peer_rounds.paired_ratio(report, "vllm", 1, "output_throughput") == 2.5


def test_a_failed_run_is_left_out_not_counted_as_zero() -> None:
    report = _report(
        [
            {"ours": {32: 300.0}, "vllm": {32: None}},
            {"ours": {32: 500.0}, "vllm": {32: 400.0}},
            {"ours": {32: None}, "vllm": {32: 100.0}},
        ]
    )
    assert peer_rounds.values(report, "vllm", 32, "output_throughput") == [400.0, 100.0]
    assert peer_rounds.round_ratios(report, "vllm", 32, "output_throughput") == [None, 1.25, None]
    assert peer_rounds.paired_ratio(report, "vllm", 32, "output_throughput") == 1.25
    assert peer_rounds.paired_ratio(report, "llama", 32, "output_throughput") is None
    notes = peer_bench.markdown(report)
    assert "vLLM c=32 (round 1): client failed (logs/vllm_r1_client.log)" in notes


def test_a_report_without_rounds_reads_as_one_round() -> None:
    old = _report([{"ours": {1: 80.0, 32: 420.0}, "vllm": {1: 40.0, 32: 600.0}}])
    old["servers"] = old.pop("rounds")[0]["servers"]
    assert peer_rounds.median_value(old, "ours", 32, "output_throughput") == 420.0
    assert peer_rounds.paired_ratio(old, "vllm", 32, "output_throughput") == pytest.approx(0.7)
    md = peer_bench.markdown(old)
    assert "rounds" not in md and "| vLLM | 32 | 0.70 |" in md


def test_markdown_of_rounds_has_medians_paired_ratios_and_each_round() -> None:
    report = _report(
        [
            {"ours": {1: 60.0, 32: 300.0}, "vllm": {1: 30.0, 32: 200.0}},
            {"ours": {1: 90.0, 32: 500.0}, "vllm": {1: 30.0, 32: 400.0}},
        ]
    )
    md = peer_bench.markdown(report)
    assert "2 rounds" in md and "ours then vLLM; vLLM then ours" in md
    assert "| ours | 32 | 400.0 |" in md  # the median of 300 and 500
    assert "| vLLM | 32 | 1.38 |" in md  # paired, not 400 / 300 = 1.33
    assert "| vLLM | 32 | 1.50 | 1.25 |" in md  # each round's own
