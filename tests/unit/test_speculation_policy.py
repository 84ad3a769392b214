"""Adaptive speculation length (policies/speculation.py): grows with acceptance, switches
off when speculation does not pay, probes back on, always within [0, k_max]."""

from __future__ import annotations

import random

import pytest

from policies.speculation import SpecController


def test_k_grows_with_high_acceptance() -> None:
    ctl = SpecController(k_max=6)
    start = ctl.next_k()
    assert 1 <= start < 6
    for _ in range(20):
        k = ctl.next_k()
        ctl.update(k, k)
    assert ctl.next_k() == 6


def test_k_tracks_moderate_acceptance() -> None:
    ctl = SpecController(k_max=8, min_gain=0.25)
    for _ in range(60):
        ctl.update(4, 2)  # acceptance 0.5: 0.5**2 = min_gain
    assert ctl.next_k() == 2
    assert ctl.enabled


def test_low_acceptance_switches_off_then_probes_back() -> None:
    ctl = SpecController(k_max=5, patience=3, probe_after=10)
    steps_on = 0
    while ctl.next_k() > 0:
        ctl.update(ctl.next_k(), 0)
        steps_on += 1
        assert steps_on < 50, "never switched off"
    assert not ctl.enabled
    for _ in range(9):
        ctl.update(0, 0)
        assert ctl.next_k() == 0
    ctl.update(0, 0)
    assert ctl.next_k() >= 1  # probing again


def test_probe_that_pays_stays_on() -> None:
    ctl = SpecController(k_max=4, patience=2, probe_after=5)
    for _ in range(40):  # nothing accepted: switches off, then probes back on
        ctl.update(ctl.next_k(), 0)
        if not ctl.enabled:
            break
    assert not ctl.enabled
    while not ctl.enabled:
        ctl.update(0, 0)
    for _ in range(30):
        k = ctl.next_k()
        assert k >= 1
        ctl.update(k, k)
    assert ctl.next_k() == 4


def test_k_stays_within_bounds() -> None:
    rng = random.Random(0)
    for k_max in (0, 1, 3, 7):
        ctl = SpecController(k_max=k_max, patience=2, probe_after=4)
        for _ in range(500):
            k = ctl.next_k()
            assert 0 <= k <= k_max
            ctl.update(k, rng.randint(0, k))
    assert SpecController(k_max=0).next_k() == 0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        SpecController(alpha=0.0)
    with pytest.raises(ValueError):
        SpecController().update(2, 3)
