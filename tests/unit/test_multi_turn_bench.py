"""`inferos bench --multi-turn --rounds`: pooling rounds into one summary."""

from __future__ import annotations

import argparse

import pytest

from serving.bench.cli import add_arguments, run
from serving.bench.multi_turn import _add_cold_row, _per_turn, pool_rounds


def _round(index: int, turn_ms: dict[int, float], cold_ms: float) -> dict:
    records = [
        {
            "round": index,
            "session": 0,
            "turn": t,
            "ttft_s": ms / 1000,
            "error": None,
            "prompt_tokens": 100 * t,
        }
        for t, ms in turn_ms.items()
    ]
    cold = [
        {
            "round": index,
            "session": 0,
            "turn": "cold",
            "ttft_s": cold_ms / 1000,
            "error": None,
            "prompt_tokens": 400,
        }
    ]
    summary = {
        "mode": "multi_turn",
        "base_url": "http://x",
        "model": "m",
        "sessions": 1,
        "turns": len(turn_ms),
        "input_len": 100,
        "turn_len": 10,
        "output_len": 8,
        "duration_s": 2.0,
        "seed": index,
        "per_turn": _per_turn(records, len(turn_ms)),
        "records": records + cold,
    }
    _add_cold_row(summary, cold, len(turn_ms))
    return summary


def test_pooled_percentiles_and_per_round_ratios():
    rounds = [
        _round(0, {1: 500, 2: 100}, 800),  # 8x
        _round(1, {1: 600, 2: 200}, 1000),  # 5x
        _round(2, {1: 550, 2: 150}, 900),  # 6x
    ]
    pooled = pool_rounds(rounds, turns=2)
    assert pooled["rounds"] == 3
    assert pooled["per_turn"]["2"]["completed"] == 3
    assert pooled["per_turn"]["2"]["ttft_ms"]["p50"] == pytest.approx(150)
    assert pooled["per_turn"]["cold"]["ttft_ms"]["p50"] == pytest.approx(900)
    assert pooled["cold_over_warm_ttft_p50"] == pytest.approx(900 / 150)
    assert pooled["cold_over_warm_per_round"] == pytest.approx([8.0, 5.0, 6.0])
    assert pooled["cold_over_warm_median_of_rounds"] == pytest.approx(6.0)
    assert pooled["duration_s"] == pytest.approx(6.0)
    assert len(pooled["records"]) == 9  # 2 turns + 1 cold probe per round
    assert [r["seed"] for r in pooled["per_round"]] == [0, 1, 2]


def test_failed_turns_count_as_failed_not_as_latencies():
    bad = _round(1, {1: 600, 2: 200}, 1000)
    for r in bad["records"]:
        if r["turn"] == 2:
            r["ttft_s"], r["error"] = None, "APIError: boom"
    pooled = pool_rounds([_round(0, {1: 500, 2: 100}, 800), bad], turns=2)
    assert pooled["per_turn"]["2"]["completed"] == 1
    assert pooled["per_turn"]["2"]["failed"] == 1
    assert pooled["per_turn"]["2"]["ttft_ms"]["p50"] == pytest.approx(100)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_rounds_flag_defaults_to_one_and_must_be_positive(capsys):
    assert _parse(["--multi-turn"]).rounds == 1
    args = _parse(["--multi-turn", "--rounds", "0"])
    assert run(args) == 2
    assert "--rounds must be positive" in capsys.readouterr().err


def test_plot_shows_the_cold_probe_beside_the_turns(tmp_path, monkeypatch):
    """The PNG has one bar per turn and one for the cold prompt, and its title the ratio."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from serving.bench.multi_turn import plot_turns

    drawn: dict = {}
    bar, set_title = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.set_title

    def recording_bar(self, xs, values, *args, **kwargs):
        drawn["values"] = list(values)
        return bar(self, xs, values, *args, **kwargs)

    def recording_title(self, title, *args, **kwargs):
        drawn["title"] = title
        return set_title(self, title, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", recording_title)
    rounds = [_round(0, {1: 600, 2: 100}, 800), _round(1, {1: 640, 2: 200}, 1200)]
    pooled = pool_rounds(rounds, 2)
    png = tmp_path / "turns.png"
    plot_turns([pooled], ["http://x"], png)
    assert png.stat().st_size > 0
    assert drawn["values"] == [620.0, 150.0, 1000.0]  # p50 of turns 1 and 2, then cold
    assert "cold / warm turn 2: 6.7x" in drawn["title"] and "2 rounds" in drawn["title"]
