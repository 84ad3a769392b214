"""SpecGate: speculation runs where it measurably emits more tokens per second than plain
decoding at that batch size, switches off where it loses, and probes back."""

from __future__ import annotations

import pytest

from policies.speculation import SpecGate


def _drive(gate: SpecGate, num_seqs: int, spec_rate: float, plain_rate: float, steps: int):
    """Feed `steps` decode steps whose tokens/s depend on the kind the gate picked."""
    picks = []
    for _ in range(steps):
        spec = gate.should_speculate(num_seqs)
        picks.append(spec)
        rate = spec_rate if spec else plain_rate
        gate.observe(num_seqs, spec, int(rate), 1.0)
    return picks


def test_measures_both_kinds_first() -> None:
    gate = SpecGate(min_samples=3)
    picks = _drive(gate, 1, spec_rate=10, plain_rate=10, steps=6)
    assert sorted(picks) == [False] * 3 + [True] * 3
    assert picks[0] is True  # speculative first


def _probe_starts(picks: list[bool], probe_kind: bool) -> list[int]:
    return [
        i for i in range(1, len(picks)) if picks[i] is probe_kind and picks[i - 1] is not probe_kind
    ]


def test_keeps_the_faster_kind_and_probes_the_other() -> None:
    gate = SpecGate(min_samples=2, probe_every=20, probe_len=2)
    picks = _drive(gate, 1, spec_rate=30, plain_rate=20, steps=104)
    steady = picks[4:]  # after 2 + 2 measuring steps
    assert steady.count(True) > 0.85 * len(steady)
    assert len(_probe_starts(steady, False)) >= 2  # the probes did happen


def test_probes_that_confirm_the_choice_come_less_often() -> None:
    gate = SpecGate(min_samples=2, probe_every=10, probe_len=2, max_backoff=4)
    picks = _drive(gate, 8, spec_rate=50, plain_rate=100, steps=300)
    starts = _probe_starts(picks[4:], True)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # 20, then 40 steps of plain decoding between probes (each probe is 2 steps), and 40
    # stays: capped at max_backoff * probe_every
    assert gaps[:2] == [20 + 2, 40 + 2]
    assert set(gaps[2:]) == {40 + 2}
    assert picks[4:].count(True) < 0.1 * len(picks[4:])


def test_a_probe_that_flips_the_choice_resets_the_interval() -> None:
    gate = SpecGate(alpha=0.5, min_samples=2, probe_every=10, probe_len=3, max_backoff=8)
    _drive(gate, 1, spec_rate=10, plain_rate=20, steps=200)  # backed off to 80 steps
    picks = _drive(gate, 1, spec_rate=80, plain_rate=20, steps=100)
    first_on = picks.index(True)
    assert first_on <= 80  # the next probe comes at the latest after the longest interval
    # a switch takes two probes that agree: the second follows 2 * probe_len steps later
    assert picks[first_on : first_on + 12] == [True] * 3 + [False] * 6 + [True] * 3
    later = picks[first_on + 12 :]
    assert later.count(True) >= 0.8 * len(later)
    # probing plain decoding again starts from the base interval, not the backed-off one
    assert _probe_starts(later, False)[0] <= 12


def test_switches_off_where_it_loses_per_batch_size() -> None:
    gate = SpecGate(min_samples=2, probe_every=50, probe_len=2)
    on_small = _drive(gate, 1, spec_rate=30, plain_rate=20, steps=40)
    off_large = _drive(gate, 8, spec_rate=60, plain_rate=100, steps=40)
    assert on_small[-20:].count(True) >= 19
    assert off_large[-20:].count(False) >= 19
    assert gate.rate(8, speculative=True) == pytest.approx(60)
    assert gate.rate(8, speculative=False) == pytest.approx(100)
    assert gate.rate(3, speculative=True) is None


def test_comes_back_on_when_speculation_starts_to_pay() -> None:
    gate = SpecGate(alpha=0.5, min_samples=2, probe_every=10, probe_len=3)
    picks = _drive(gate, 1, spec_rate=10, plain_rate=20, steps=30)
    assert picks[-10:].count(False) >= 7
    # the text became predictable: speculative steps now emit 4x the tokens
    picks = _drive(gate, 1, spec_rate=80, plain_rate=20, steps=40)
    assert picks[-20:].count(True) >= 14  # on, apart from its own probes of plain steps


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError):
        SpecGate(alpha=0.0)
    with pytest.raises(ValueError):
        SpecGate(probe_len=0)


def test_one_lucky_speculative_step_does_not_flip_the_choice() -> None:
    """Rates are tokens over seconds of the averaged steps: a rare short step that emitted
    a whole draft must not outweigh the steps it is averaged with (a mean of per-step rates
    jumps by alpha * 320 tok/s on it, and would switch a losing kind on)."""
    gate = SpecGate(alpha=0.2, min_samples=2, probe_every=10, probe_len=2)
    picks = []
    spec_steps = 0
    for _ in range(400):
        spec = gate.should_speculate(8)
        picks.append(spec)
        if spec:
            spec_steps += 1
            lucky = spec_steps % 5 == 0
            gate.observe(8, True, 16 if lucky else 8, 0.05 if lucky else 0.2)  # 320 / 40 tok/s
        else:
            gate.observe(8, False, 8, 0.1)  # 80 tok/s
    # speculation (~56 tok/s overall) only ever runs as the initial samples and probes
    assert gate.rate(8, speculative=True) < gate.rate(8, speculative=False)
    assert picks[4:].count(True) <= 2 * len(_probe_starts(picks[4:], True))


def test_speculates_only_when_it_wins_by_the_margin() -> None:
    """Level rates (a full-depth draft at batch 8) keep speculation off: a wrong "on" costs
    k + 1 draft passes per step, a wrong "off" at most `min_gain` of throughput."""
    level = SpecGate(min_samples=2, probe_every=50, probe_len=2, min_gain=0.05)
    picks = _drive(level, 8, spec_rate=103, plain_rate=100, steps=40)
    assert picks[-30:].count(True) == 0
    ahead = SpecGate(min_samples=2, probe_every=50, probe_len=2, min_gain=0.05)
    picks = _drive(ahead, 8, spec_rate=110, plain_rate=100, steps=40)
    assert picks[-30:].count(True) == 30


def test_each_batch_size_up_to_8_is_measured_on_its_own() -> None:
    """Plain decoding at 5 sequences is slower than at 8; pooled in one bucket, speculation
    measured at 8 would look faster than plain decoding measured at 5."""
    gate = SpecGate(min_samples=2, probe_every=100, probe_len=2)
    _drive(gate, 5, spec_rate=40, plain_rate=60, steps=20)  # speculation loses at 5
    _drive(gate, 8, spec_rate=70, plain_rate=100, steps=20)  # and at 8
    assert gate.rate(5, speculative=False) == pytest.approx(60)
    assert gate.rate(8, speculative=True) == pytest.approx(70)
    assert gate.rate(6, speculative=True) is None
    assert not gate.should_speculate(5) and not gate.should_speculate(8)


def test_larger_batches_share_power_of_two_buckets() -> None:
    gate = SpecGate(min_samples=1)
    gate.observe(9, False, 9, 1.0)
    gate.observe(16, False, 18, 1.0)
    assert gate.rate(12, speculative=False) == pytest.approx(10.8)  # 9 + 0.2 * (18 - 9)
    assert gate.rate(17, speculative=False) is None


def _runs(picks: list[bool], kind: bool) -> list[int]:
    """Lengths of the stretches of `kind` in `picks`."""
    runs, n = [], 0
    for p in [*picks, not kind]:
        if p is kind:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_compares_kinds_over_adjacent_steps_not_stale_rates() -> None:
    """The machine slows down steadily (a neighbour on the host, longer contexts) while
    speculation stays 20 % slower than plain decoding at every moment. Compared with its
    own rate from the last probe, plain decoding keeps looking slower than it was, so a
    gate on remembered rates switches speculation on between probes."""
    gate = SpecGate(min_samples=2, probe_every=10, probe_len=3)
    picks = []
    for step in range(400):
        slowdown = 1.0 + 0.01 * step
        spec = gate.should_speculate(8)
        picks.append(spec)
        gate.observe(8, spec, 8, (1.0 if spec else 0.8) * slowdown)
    assert set(_runs(picks[4:], True)) == {3}  # speculation ran only as 3-step probes


def test_one_probe_does_not_switch_but_two_that_agree_do() -> None:
    gate = SpecGate(min_samples=2, probe_every=10, probe_len=2)
    _drive(gate, 8, spec_rate=50, plain_rate=100, steps=30)  # off
    picks = []
    lucky = True
    for _ in range(30):  # one lucky probe of speculation, then the usual losing steps
        spec = gate.should_speculate(8)
        picks.append(spec)
        if spec and lucky:
            gate.observe(8, True, 180, 1.0)  # this probe alone: 115 tok/s > plain's 100
            lucky = False
        else:
            gate.observe(8, spec, 50 if spec else 100, 1.0)
    starts = _probe_starts(picks, True)
    assert len(starts) >= 2 and starts[1] - starts[0] == 2 + 4  # re-probed at once
    assert picks[starts[1] + 2 :].count(True) == 0  # together they said no: still off
