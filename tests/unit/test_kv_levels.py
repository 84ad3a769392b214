"""The KV level policy: pinned sinks and window, profile limits, and monotonicity in pressure
and importance. Pure Python; randomized cases are seeded so failures reproduce."""

from __future__ import annotations

import random

import pytest

from policies.kv_levels import (
    AGGRESSIVE,
    BALANCED,
    BASELINE,
    PROFILES,
    SAFE,
    BlockStats,
    Level,
    Profile,
    assign_levels,
    live_unit_levels,
    pinned_blocks,
    sink_blocks,
)

BS = 16
PRESSURES = [0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.5]


def _blocks(num_tokens: int, seed: int) -> list[BlockStats]:
    rng = random.Random(seed)
    n = -(-num_tokens // BS)
    return [
        BlockStats(i, rng.random() ** 3, rng.randrange(100), rng.randrange(20), rng.random())
        for i in range(n)
    ]


def _cases():
    for seed in range(12):
        num_tokens = random.Random(seed).randrange(1, 1200)
        yield num_tokens, _blocks(num_tokens, seed)


def test_profiles_registry() -> None:
    assert set(PROFILES) == {"baseline", "safe", "balanced", "aggressive"}
    assert SAFE.deepest_level == Level.L1 and BASELINE.deepest_level == Level.L0
    assert BALANCED.deepest_level == AGGRESSIVE.deepest_level == Level.L3


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=lambda p: p.name)
def test_sinks_and_window_stay_l0_under_any_pressure(profile: Profile) -> None:
    """Window always L0; sinks L0 too, or never below `sink_level` where a profile allows."""
    for num_tokens, blocks in _cases():
        pinned = pinned_blocks(profile, BS, num_tokens)
        sinks = set(range(-(-min(profile.num_sink_tokens, num_tokens) // BS)))
        window = {
            t // BS for t in range(max(0, num_tokens - profile.recent_window_tokens), num_tokens)
        }
        assert window <= pinned
        assert (sinks <= pinned) == (profile.sink_level == Level.L0 or not sinks)
        for pressure in PRESSURES:
            levels = assign_levels(blocks, profile, pressure, BS, num_tokens)
            assert len(levels) == len(blocks)
            for b, level in zip(blocks, levels, strict=True):
                if b.index in pinned:
                    assert level == Level.L0
                if b.index in sinks:
                    assert level <= profile.sink_level


def test_sink_level_l1_sinks_go_int8_under_pressure_never_deeper() -> None:
    p = Profile(
        "s",
        0,
        4,
        frozenset(Level),
        l1_importance=9.0,
        l2_importance=9.0,
        l1_pressure=0.2,
        l2_pressure=0.4,
        spill_pressure=0.9,
        sink_level=Level.L1,
    )
    blocks = [BlockStats(i, 100.0 if i == 0 else 1.0) for i in range(8)]  # sinks: most mass
    assert assign_levels(blocks, p, 0.1, BS, 8 * BS) == [Level.L0] * 8
    assert assign_levels(blocks, p, 0.3, BS, 8 * BS) == [Level.L1] * 8
    at_spill = assign_levels(blocks, p, 1.0, BS, 8 * BS)
    assert at_spill == [Level.L1] + [Level.L3] * 7  # the sinks' mass didn't shield the rest
    assert p.level_bits(Level.L1) == (8, 8) and p.level_bits(Level.L2) == (4, 4)
    assert AGGRESSIVE.level_bits(Level.L2) == (4, 2)
    with pytest.raises(ValueError):
        p.level_bits(Level.L0)


def test_pinned_block_arithmetic() -> None:
    # 100 tokens, bs 16: blocks 0..6; 4 sinks -> block 0; 64-token window -> tokens 36..99.
    sinks_and_window = Profile("x", 64, 4, frozenset(Level))
    assert pinned_blocks(sinks_and_window, BS, 100) == {0, 2, 3, 4, 5, 6}
    # A partial tail is pinned even with no window; a full one is not.
    no_window = Profile("x", 0, 0, frozenset(Level))
    assert pinned_blocks(no_window, BS, 40) == {2}
    assert pinned_blocks(no_window, BS, 48) == set()


def test_baseline_always_l0() -> None:
    for num_tokens, blocks in _cases():
        for pressure in PRESSURES:
            assert set(assign_levels(blocks, BASELINE, pressure, BS, num_tokens)) <= {Level.L0}


def test_safe_never_below_l1_and_does_demote() -> None:
    seen = set()
    for num_tokens, blocks in _cases():
        for pressure in PRESSURES:
            levels = assign_levels(blocks, SAFE, pressure, BS, num_tokens)
            assert max(levels) <= Level.L1
            seen.update(levels)
    assert Level.L1 in seen


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=lambda p: p.name)
def test_more_pressure_never_shallower(profile: Profile) -> None:
    for num_tokens, blocks in _cases():
        previous = [Level.L0] * len(blocks)
        for pressure in PRESSURES:
            levels = assign_levels(blocks, profile, pressure, BS, num_tokens)
            assert all(now >= before for now, before in zip(levels, previous, strict=True))
            assert all(level in profile.allowed_levels for level in levels)
            previous = levels


@pytest.mark.parametrize("profile", [SAFE, BALANCED, AGGRESSIVE], ids=lambda p: p.name)
def test_less_important_never_shallower(profile: Profile) -> None:
    for num_tokens, blocks in _cases():
        pinned = pinned_blocks(profile, BS, num_tokens) | sink_blocks(profile, BS, num_tokens)
        for pressure in PRESSURES:
            levels = assign_levels(blocks, profile, pressure, BS, num_tokens)
            free = sorted(
                (b.attention_mass, lv)
                for b, lv in zip(blocks, levels, strict=True)
                if b.index not in pinned
            )
            assert all(a[1] >= b[1] for a, b in zip(free, free[1:], strict=False))


LADDER = Profile(
    "ladder", recent_window_tokens=128, num_sink_tokens=4, allowed_levels=frozenset(Level),
    l1_importance=1.0, l2_importance=0.25, l1_pressure=0.3, l2_pressure=0.6, spill_pressure=0.9,
)  # fmt: skip


def test_ladder_importance_and_spill() -> None:
    # 20 full blocks, window 128 tokens -> blocks 12..19 pinned, plus block 0 (sinks).
    num_tokens = 20 * BS
    masses = [1.0] * 20
    masses[3], masses[5] = 0.0, 0.5  # 3: least important; 5: below average, not below 0.25x
    blocks = [BlockStats(i, m) for i, m in enumerate(masses)]
    at = {p: assign_levels(blocks, LADDER, p, BS, num_tokens) for p in (0.1, 0.4, 0.7, 0.95)}
    assert set(at[0.1]) == {Level.L0}
    assert at[0.4][3] == at[0.4][5] == Level.L1 and at[0.4][4] == Level.L0
    assert at[0.7][3] == Level.L2 and at[0.7][5] == Level.L1 and at[0.7][4] == Level.L0
    assert all(lv == Level.L3 for i, lv in enumerate(at[0.95]) if 1 <= i < 12)
    assert all(lv == Level.L0 for i, lv in enumerate(at[0.95]) if i == 0 or i >= 12)


def test_zero_attention_mass_is_average_and_order_is_preserved() -> None:
    p = Profile("p", 64, 4, frozenset(Level), l1_importance=2.0, l2_importance=1.0,
                l1_pressure=0.0, l2_pressure=0.3, spill_pressure=0.8)  # fmt: skip
    blocks = [BlockStats(i, 0.0) for i in reversed(range(10))]
    levels = assign_levels(blocks, p, 0.5, BS, 10 * BS)
    # window 64 tokens -> blocks 6..9 pinned; relative 1.0 < 2.0 -> L1, not < 1.0.
    expected = [Level.L0 if b.index in {0, 6, 7, 8, 9} else Level.L1 for b in blocks]
    assert levels == expected


def test_one_unit_size_for_every_profile() -> None:
    """The engine keeps one quantization unit size (its pools are per level, not per
    profile), so all profiles must agree on it."""
    assert len({p.quant_group_tokens for p in PROFILES.values()}) == 1
    with pytest.raises(ValueError):
        Profile("bad", 0, 0, frozenset(Level), quant_group_tokens=24)


@pytest.mark.parametrize("profile", [SAFE, BALANCED, AGGRESSIVE], ids=lambda p: p.name)
def test_live_units_pressure_drives_demotion(profile: Profile) -> None:
    """Full units only; no pressure keeps everything L0 (aggressive: INT8 at most); full
    pressure (with no attention statistics yet) demotes every unpinned unit to the
    profile's deepest in-memory level."""
    g = profile.quant_group_tokens
    num_tokens = 16 * g + g // 2  # a half-filled tail unit
    pinned = pinned_blocks(profile, g, num_tokens)
    idle = live_unit_levels([], profile, 0.0, num_tokens)
    idle_level = Level.L0 if profile.l1_pressure > 0 else Level.L1
    assert len(idle) == 16
    assert all(lv == (Level.L0 if u in pinned else idle_level) for u, lv in enumerate(idle))
    full = live_unit_levels([], profile, 1.0, num_tokens)
    deepest = Level.L1 if profile is SAFE else Level.L2
    assert [u for u, lv in enumerate(full) if lv == Level.L0] == sorted(u for u in pinned if u < 16)
    sinks = sink_blocks(profile, g, num_tokens) - pinned  # aggressive: sinks at INT8
    assert all(lv == deepest for u, lv in enumerate(full) if u not in pinned | sinks)
    assert all(full[u] == profile.sink_level for u in sinks)
    assert Level.L3 not in full  # live sequences never get spilled units


def test_live_units_keep_heavily_attended_units_shallower() -> None:
    g = BALANCED.quant_group_tokens
    masses = [1.0] * 16
    masses[5] = 50.0  # far above average
    levels = live_unit_levels(masses, BALANCED, BALANCED.l2_pressure, 16 * g)
    assert levels[5] < levels[6]


def test_invalid_profiles_rejected() -> None:
    with pytest.raises(ValueError):
        Profile("bad", 0, 0, frozenset({Level.L1}))
    with pytest.raises(ValueError):
        Profile("bad", 0, 0, frozenset(Level), l1_pressure=0.9, l2_pressure=0.5)
    with pytest.raises(ValueError):
        Profile("bad", 0, 0, frozenset(Level), l1_importance=0.1, l2_importance=0.5)
    with pytest.raises(ValueError):
        Profile("bad", 0, 4, frozenset(Level), sink_level=Level.L2)
    with pytest.raises(ValueError):
        Profile("bad", 0, 0, frozenset(Level), l2_value_bits=3)
