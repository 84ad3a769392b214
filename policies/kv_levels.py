"""Which level each KV block of a sequence should sit at, as a pure function (no torch).

Levels: L0 full precision, L1 int8, L2 int4, L3 spilled to disk. `assign_levels` applies,
per block:

1. A profile that allows only L0 (`baseline`) keeps every block at L0.
2. Pinned blocks stay L0 under any pressure: those holding any of the first
   `num_sink_tokens` tokens (attention sinks), any of the last `recent_window_tokens`
   tokens, and a partial tail block (decode still appends to it). A profile with
   `sink_level = L1` instead lets the sink blocks go to INT8 (never deeper) as soon as
   pressure allows any demotion.
3. Every other block gets a *relative importance*: its importance divided by the mean over
   these eligible blocks (1.0 = average; all 1.0 when the mean is 0, e.g. before decode).
   Importance = attention_mass + access_weight * access_count
   + recency_weight / (1 + steps since its last access, against the newest access)
   - age_weight * age, floored at 0. Default weights make it the attention mass alone.
4. The deepest allowed level whose rule fires wins, tried from L3 up:
   L3 if pressure >= spill_pressure; L2 if pressure >= l2_pressure and relative importance
   < l2_importance; L1 if pressure >= l1_pressure and relative importance < l1_importance;
   else L0. A level the profile doesn't allow is skipped, never exceeded.

Since each rule only fires more often as pressure rises or importance falls (profiles are
validated so that l1_pressure <= l2_pressure <= spill_pressure and l2_importance <=
l1_importance), more pressure never yields a shallower level and a less important block is
never kept shallower than a more important one in the same call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

_INF = math.inf


class Level(IntEnum):
    """Storage level of a block; a larger value is deeper (cheaper, lossier or slower)."""

    L0 = 0  # fp16/bf16/fp32
    L1 = 1  # int8
    L2 = 2  # int4, two per byte
    L3 = 3  # spilled


@dataclass(frozen=True, slots=True)
class BlockStats:
    index: int  # position of the block in the sequence (block i holds tokens i*bs .. i*bs+bs-1)
    attention_mass: float  # attention received, accumulated during decode
    last_access_step: int = 0
    access_count: int = 0
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class Profile:
    """Windows, thresholds and allowed levels; importances are relative (1.0 = average)."""

    name: str
    recent_window_tokens: int
    num_sink_tokens: int
    allowed_levels: frozenset[Level]
    l1_importance: float = 0.0  # demote to L1 below this relative importance
    l2_importance: float = 0.0  # demote to L2 below this one (<= l1_importance)
    l1_pressure: float = _INF  # KV pool usage fraction from which L1 demotion starts
    l2_pressure: float = _INF
    spill_pressure: float = _INF  # from here every eligible block is spilled (L3)
    access_weight: float = 0.0
    recency_weight: float = 0.0
    age_weight: float = 0.0
    # Tokens per quantization unit (a multiple of the 16-token block): the engine quantizes
    # runs of blocks this long as one unit and key scales span all its tokens, so it sets
    # the scale overhead (4 / G bytes per key element); bits per level: `level_bits`.
    quant_group_tokens: int = 128
    # Deepest level of the blocks holding the sink tokens: L0 pins them (StreamingLLM's
    # rule); L1 lets them go to INT8 under pressure, which costs little (INT8 is nearly
    # lossless) and spares the whole first unit at L0.
    sink_level: Level = Level.L0
    l2_value_bits: int = 4  # bits of the values at L2 (keys are always 4): 2 as in KIVI-2

    def __post_init__(self) -> None:
        if Level.L0 not in self.allowed_levels:
            raise ValueError(f"profile {self.name!r} must allow L0")
        if not self.l1_pressure <= self.l2_pressure <= self.spill_pressure:
            raise ValueError(f"profile {self.name!r}: pressure thresholds must be ordered")
        if self.l2_importance > self.l1_importance:
            raise ValueError(f"profile {self.name!r}: l2_importance must be <= l1_importance")
        if self.recent_window_tokens < 0 or self.num_sink_tokens < 0:
            raise ValueError(f"profile {self.name!r}: windows must be >= 0")
        if self.quant_group_tokens <= 0 or self.quant_group_tokens % 16:
            raise ValueError(f"profile {self.name!r}: quant_group_tokens must be a multiple of 16")
        if self.sink_level not in (Level.L0, Level.L1):
            raise ValueError(f"profile {self.name!r}: sink_level must be L0 or L1")
        if self.l2_value_bits not in (4, 2):
            raise ValueError(f"profile {self.name!r}: l2_value_bits must be 4 or 2")

    def level_bits(self, level: Level) -> tuple[int, int]:
        """(key bits, value bits) of a quantized level under this profile."""
        if level == Level.L1:
            return 8, 8
        if level == Level.L2:
            return 4, self.l2_value_bits
        raise ValueError(f"{level.name} is not a quantized level")

    @property
    def deepest_level(self) -> Level:
        return max(self.allowed_levels)


# Tuned with `inferos eval ppl` on wikitext-2 at context 2048 with SmolLM2-135M (table and
# what was tried: README "Evaluate KV quality"). All share 128-token units: key scales then
# cost 4/128 byte per element, and the engine keeps one unit size. The recent window is the
# unit decode is filling (0-127 tokens at L0): a pinned 128-token window bought less
# quality per byte than the sinks. At full pressure, with no attention statistics:
# - safe: every full unit INT8, the sinks too (INT8 costs them nothing measurable, and
#   pinning them would keep the whole first unit at L0, below 1.9x);
# - balanced: first unit (attention sinks) L0, the rest INT4: INT4 sinks alone cost more
#   than twice the PPL of all other INT4 units together;
# - aggressive: first unit INT8, the rest INT4 keys with 2-bit values (KIVI-style): 2-bit
#   values with INT4 sinks cost 3x more than with good sinks.
# A unit that received more than `l2_importance` times the average attention stays INT8
# while pressure is below `spill_pressure` (from there a live sequence's units go to L2).
BASELINE = Profile("baseline", 0, 0, frozenset({Level.L0}))
SAFE = Profile(
    "safe", recent_window_tokens=0, num_sink_tokens=0,
    allowed_levels=frozenset({Level.L0, Level.L1}),
    l1_importance=_INF, l1_pressure=0.5,
)  # fmt: skip
BALANCED = Profile(
    "balanced", recent_window_tokens=0, num_sink_tokens=4, allowed_levels=frozenset(Level),
    l1_importance=_INF, l2_importance=2.0, l1_pressure=0.3, l2_pressure=0.6, spill_pressure=0.9,
)  # fmt: skip
AGGRESSIVE = Profile(
    "aggressive", recent_window_tokens=0, num_sink_tokens=4, allowed_levels=frozenset(Level),
    l1_importance=_INF, l2_importance=4.0, l1_pressure=0.0, l2_pressure=0.3, spill_pressure=0.8,
    sink_level=Level.L1, l2_value_bits=2,
)  # fmt: skip
PROFILES: dict[str, Profile] = {p.name: p for p in (BASELINE, SAFE, BALANCED, AGGRESSIVE)}


def sink_blocks(profile: Profile, block_size: int, num_tokens: int) -> set[int]:
    """Indices of the blocks holding any of the first `num_sink_tokens` tokens."""
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    return set(range(0, -(-min(profile.num_sink_tokens, max(0, num_tokens)) // block_size)))


def pinned_blocks(profile: Profile, block_size: int, num_tokens: int) -> set[int]:
    """Indices of the blocks that must stay L0: sinks (unless `sink_level` lets them go to
    INT8), recent window, partial tail."""
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    if num_tokens <= 0:
        return set()
    last = (num_tokens - 1) // block_size
    sinks = sink_blocks(profile, block_size, num_tokens) if profile.sink_level == Level.L0 else ()
    first_recent = max(0, num_tokens - profile.recent_window_tokens) // block_size
    pinned = set(sinks) | set(range(first_recent, last + 1) if profile.recent_window_tokens else ())
    if num_tokens % block_size:
        pinned.add(last)
    return pinned


def block_importance(stats: BlockStats, profile: Profile, newest_step: int) -> float:
    """Absolute importance of one block under the profile's weights (see module doc)."""
    since = max(0, newest_step - stats.last_access_step)
    value = (
        stats.attention_mass
        + profile.access_weight * stats.access_count
        + profile.recency_weight / (1 + since)
        - profile.age_weight * stats.age
    )
    return max(0.0, value)


def _level_for(relative: float, profile: Profile, pressure: float) -> Level:
    allowed = profile.allowed_levels
    if Level.L3 in allowed and pressure >= profile.spill_pressure:
        return Level.L3
    if Level.L2 in allowed and pressure >= profile.l2_pressure and relative < profile.l2_importance:
        return Level.L2
    if Level.L1 in allowed and pressure >= profile.l1_pressure and relative < profile.l1_importance:
        return Level.L1
    return Level.L0


def assign_levels(
    blocks: list[BlockStats], profile: Profile, pressure: float, block_size: int, num_tokens: int
) -> list[Level]:
    """Level for each block, in the order given; `pressure` is the KV pool's used fraction."""
    if profile.allowed_levels == {Level.L0} or not blocks:
        return [Level.L0] * len(blocks)
    pinned = pinned_blocks(profile, block_size, num_tokens)
    # sinks allowed below L0: demoted as soon as pressure allows, never below sink_level, and
    # left out of the mean (their attention mass would make every other block look idle)
    capped = sink_blocks(profile, block_size, num_tokens) - pinned
    eligible = [b for b in blocks if b.index not in pinned and b.index not in capped]
    newest = max((b.last_access_step for b in blocks), default=0)
    importance = {b.index: block_importance(b, profile, newest) for b in eligible}
    mean = sum(importance.values()) / len(importance) if importance else 0.0
    levels = []
    for b in blocks:
        if b.index in pinned:
            levels.append(Level.L0)
            continue
        if b.index in capped:
            levels.append(min(_level_for(0.0, profile, pressure), profile.sink_level))
            continue
        relative = importance[b.index] / mean if mean > 0 else 1.0
        levels.append(_level_for(relative, profile, pressure))
    return levels


def live_unit_levels(
    unit_masses: list[float], profile: Profile, pressure: float, num_tokens: int
) -> list[Level]:
    """Level of each *complete* quantization unit of a running sequence.

    Units are `profile.quant_group_tokens` consecutive tokens from token 0 (unit u holds
    tokens u*G .. u*G+G-1); only the `num_tokens // G` complete ones may leave L0, the
    partial tail stays L0 while decode fills it. `unit_masses[u]` is the attention mass unit
    u received (missing entries count as 0). A live sequence reads every unit at every step,
    so a spill decision (L3) keeps the unit at the profile's deepest in-memory level instead.
    """
    g = profile.quant_group_tokens
    num_units = max(0, num_tokens) // g
    stats = [
        BlockStats(u, unit_masses[u] if u < len(unit_masses) else 0.0) for u in range(num_units)
    ]
    levels = assign_levels(stats, profile, pressure, g, num_tokens)
    in_memory = max(profile.allowed_levels - {Level.L3})
    return [min(level, in_memory) for level in levels]
