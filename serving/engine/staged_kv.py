"""Staged KV in the engine's live cache: older blocks of running sequences move to INT8/INT4.

The paged pool holds L0 blocks. Runs of `unit_blocks` consecutive blocks that the profile
(`policies.kv_levels`) sends deeper are quantized together into a `QuantPool` slot, and
their pool blocks are freed: the sequence's block table keeps a `HOLE` there. Decode
attention takes those units layer by layer from the quant pools and dequantizes them into
the gathered context (`serving.models.attention`), so the extra memory is one layer's worth.

Reversible: before a unit is first quantized its bit-exact original goes to the spill tier
(local disk, counted as disk bytes, never as KV memory), and promotion copies it back.

Budget: the pool's blocks and the quantized units share one byte budget
(`BlockPool.extra_bytes`), so a demotion frees room for more sequences.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policies.kv_levels import PROFILES, Level, Profile, live_unit_levels
from serving.engine.block_pool import BlockPool
from serving.engine.sequence import Sequence
from serving.kv.block_format import KVLayout, KVPayload
from serving.kv.quant import QuantizedBlock, dequantize_block, quantize_block
from serving.kv.quant_pool import QuantPool
from serving.kv.spill import SpillStore

logger = logging.getLogger(__name__)

ExportFn = Callable[[list[int], int], KVPayload]
HOLE = -1  # block-table entry of a block whose data lives in a quantized unit
PoolKey = tuple[Level, int]  # (level, value bits): one pool holds one unit shape
PROMOTION_MARGIN = 0.25  # pressure headroom a promotion needs (see _rebalance_seq)
DEFAULT_UNIT_TOKENS = 128  # what the profiles were tuned with (policies/kv_levels.py)


@dataclass(slots=True)
class Unit:
    level: Level
    slot: int
    num_bytes: int
    value_bits: int

    @property
    def pool(self) -> PoolKey:
        return (self.level, self.value_bits)


@dataclass(slots=True)
class SeqKVState:
    """What the manager knows of one running sequence."""

    units: dict[int, Unit] = field(default_factory=dict)  # unit index → quantized unit
    mass: list[float] = field(default_factory=list)  # attention mass received, per block
    originals: dict[int, int] = field(default_factory=dict)  # unit index → spilled bytes


@dataclass(slots=True)
class CompactUnits:
    slots: torch.Tensor  # [B, U] slot in the pool (padding: 0)
    first_block: torch.Tensor  # [B, U] logical index of the unit's first block
    valid: torch.Tensor  # [B, U] False for padding


@dataclass(slots=True)
class CompactPlan:
    """Decode's view: each row's L0 blocks and units, padded (see StagedKVManager._compact)."""

    l0_tables: torch.Tensor  # [B, N0] pool block ids (padding: 0)
    l0_logical: torch.Tensor  # [B, N0] logical block index (padding: a dummy column)
    l0_valid: torch.Tensor  # [B, N0 * bs] token inside the context and not padding
    units: dict[PoolKey, CompactUnits]
    num_block_columns: int  # logical blocks + the dummy column, for importance


@dataclass(slots=True)
class StagedPlan:
    """Where quantized units sit in one step's gathered context, per level (engine thread)."""

    pools: dict[PoolKey, QuantPool]
    rows: dict[PoolKey, torch.Tensor]  # [n] row of the batch (sequence index)
    token_starts: dict[PoolKey, torch.Tensor]  # [n] first token of the unit in its sequence
    slots: dict[PoolKey, torch.Tensor]  # [n] slot in that pool
    unit_tokens: int
    compact: CompactPlan | None = None

    def for_row(self, row: int) -> StagedPlan:
        keep = {lv: (r == row).nonzero().flatten() for lv, r in self.rows.items()}
        return StagedPlan(
            self.pools,
            {lv: torch.zeros_like(k) for lv, k in keep.items()},
            {lv: self.token_starts[lv][k] for lv, k in keep.items()},
            {lv: self.slots[lv][k] for lv, k in keep.items()},
            self.unit_tokens,
        )


@dataclass(slots=True)
class LevelCounters:
    demotions: int = 0
    promotions: int = 0
    spills: int = 0
    imported: int = 0  # units that arrived quantized (from the store) and stayed so


class StagedKVManager:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        block_pool: BlockPool,
        block_size: int,
        profile: str = "baseline",
        spill_dir: Path | None = None,
        unit_tokens: int = DEFAULT_UNIT_TOKENS,
    ):
        self.kv_cache = kv_cache  # [L, 2, num_blocks, bs, H, D]
        self.block_pool = block_pool
        self.block_size = block_size
        self.pools: dict[PoolKey, QuantPool] = {}
        self.states: dict[str, SeqKVState] = {}
        self.profile = PROFILES[profile]
        self.window_override: int | None = None
        self._spill_dir = spill_dir
        self._spill: SpillStore | None = None
        self._ids = itertools.count()
        self._spill_prefix = f"live-{id(self):x}"
        self.counters = LevelCounters()
        self.spill_bytes = 0  # originals on disk (counted as disk, never as KV memory)
        # One unit size per engine: every unit of a level shares one pool array.
        self.ub = max(1, unit_tokens // block_size)

    # --- configuration -----------------------------------------------------------------
    def set_profile(self, name: str, window: int | None = None) -> None:
        self.profile = PROFILES[name]
        self.window_override = window

    def profile_for(self, seq: Sequence) -> Profile:
        profile = PROFILES.get(seq.params.kv_profile or "", self.profile)
        if self.window_override is not None and profile.name != "baseline":
            profile = dataclasses.replace(profile, recent_window_tokens=self.window_override)
        return profile

    @property
    def spill(self) -> SpillStore:
        if self._spill is None:
            directory = self._spill_dir or Path(tempfile.mkdtemp(prefix="inferos-kv-spill-"))
            self._spill = SpillStore(directory)
        return self._spill

    # --- bookkeeping -------------------------------------------------------------------
    def state(self, seq: Sequence) -> SeqKVState:
        return self.states.setdefault(seq.req_id, SeqKVState())

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted: free its units and spilled originals."""
        st = self.states.pop(seq.req_id, None)
        if st is None:
            return
        for unit in st.units.values():
            self._drop_unit(unit)
        for u, nbytes in st.originals.items():
            self.spill.drop(self._key(seq, u))
            self.spill_bytes -= nbytes

    def _drop_unit(self, unit: Unit) -> None:
        self.pools[unit.pool].release(unit.slot)
        self.block_pool.extra_bytes -= unit.num_bytes

    def _key(self, seq: Sequence, unit_index: int) -> str:
        return f"{self._spill_prefix}/{seq.req_id}/{unit_index}"

    def add_mass(self, seq: Sequence, per_block: list[float]) -> None:
        mass = self.state(seq).mass
        if len(mass) < len(per_block):
            mass.extend([0.0] * (len(per_block) - len(mass)))
        for i, m in enumerate(per_block):
            mass[i] += m

    def _pool(self, key: PoolKey) -> QuantPool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = QuantPool()
        return pool

    def _level_sum(self, level: Level, measure: Callable[[QuantPool], int]) -> int:
        return sum(measure(p) for (lv, _), p in list(self.pools.items()) if lv == level)

    def active(self, seqs: list[Sequence]) -> bool:
        """Whether any of `seqs` is staged at all (baseline sequences cost nothing)."""
        return any(
            seq.req_id in self.states or self.profile_for(seq).name != "baseline" for seq in seqs
        )

    def import_payload(
        self,
        seq: Sequence,
        payload: KVPayload,
        import_blocks: Callable[[list[int], KVPayload], None],
    ) -> None:
        """Admit KV from elsewhere into the sequence's freshly allocated blocks: full
        precision blocks are copied, quantized units (from the store) stay quantized."""
        if not any(isinstance(b, QuantizedBlock) for b in payload.blocks):
            import_blocks(seq.block_table, payload)
            return
        st = self.state(seq)
        index = 0
        for element in payload.blocks:
            if not isinstance(element, QuantizedBlock):
                import_blocks([seq.block_table[index]], KVPayload(payload.layout, 0, [element]))
                index += 1
                continue
            n = element.shape[2] // self.block_size
            if n != self.ub or index % self.ub:
                raise ValueError(f"quantized unit of {n} blocks at block {index} doesn't fit")
            level = Level.L1 if element.bits == 8 else Level.L2
            unit = Unit(level, 0, element.num_bytes, element.v_bits)
            unit.slot = self._pool(unit.pool).put(element)
            self.block_pool.free(seq.block_table[index : index + n])
            seq.block_table[index : index + n] = [HOLE] * n
            st.units[index // n] = unit
            self.block_pool.extra_bytes += element.num_bytes
            self.counters.imported += 1
            index += n

    def export(
        self, seq: Sequence, num_tokens: int, layout: KVLayout, export_blocks: ExportFn
    ) -> KVPayload:
        """The sequence's first `num_tokens` tokens of KV as they are held: full-precision
        blocks, and quantized units as `QuantizedBlock`s (with `spans`/`sizes`)."""
        st = self.states.get(seq.req_id)
        if st is None or not st.units:
            return export_blocks(seq.block_table, num_tokens)
        n = -(-num_tokens // self.block_size)
        elements: list[object] = []
        spans: list[int] = []
        sizes: list[int] = []
        i = 0
        while i < n:
            if seq.block_table[i] == HOLE:
                unit = st.units[i // self.ub]
                qb = self.pools[unit.pool].get(unit.slot)
                elements.append(qb)
                spans.append(self.ub)
                sizes.append(qb.num_bytes)
                i += self.ub
            else:
                elements.append(self.kv_cache[:, :, seq.block_table[i]].clone())
                spans.append(1)
                sizes.append(layout.bytes_per_block())
                i += 1
        return KVPayload(layout, num_tokens, elements, spans, sizes)

    # --- levels -----------------------------------------------------------------------
    def bytes_per_level(self) -> dict[str, int]:
        """Safe to read from another thread: plain int reads, no iteration."""
        return {
            "L0": self.block_pool.num_used_blocks * self.block_pool.block_bytes,
            "L1": self._level_sum(Level.L1, lambda p: p.num_bytes),
            "L2": self._level_sum(Level.L2, lambda p: p.num_bytes),
            "L3": self.spill_bytes,  # the spill tier holds originals of demoted units
        }

    def blocks_per_level(self) -> dict[str, int]:
        return {
            "L0": self.block_pool.num_used_blocks,
            "L1": self._level_sum(Level.L1, lambda p: p.num_units) * self.ub,
            "L2": self._level_sum(Level.L2, lambda p: p.num_units) * self.ub,
            "L3": 0,  # a live sequence reads every block every step: none is only on disk
        }

    def rebalance(self, seqs: list[Sequence], pressure: float) -> int:
        """Move every unit of `seqs` to the level the policy gives it now; returns moves."""
        moves = 0
        for seq in seqs:
            profile = self.profile_for(seq)
            if profile.name == "baseline" and not self.states.get(seq.req_id, SeqKVState()).units:
                continue
            moves += self._rebalance_seq(seq, profile, pressure)
        return moves

    def _rebalance_seq(self, seq: Sequence, profile: Profile, pressure: float) -> int:
        """Levels from `policies.kv_levels.live_unit_levels` — the rule `inferos eval ppl`
        measures — applied to this sequence's complete units."""
        ub = self.ub
        st = self.state(seq)
        masses = [sum(st.mass[u * ub : (u + 1) * ub]) for u in range(len(st.mass) // ub + 1)]
        # only units whose every token is computed may leave L0
        g = dataclasses.replace(profile, quant_group_tokens=ub * self.block_size)
        deeper = live_unit_levels(masses, g, pressure, seq.num_computed_tokens)
        # Hysteresis: a unit comes back up only if it would stay up with PROMOTION_MARGIN
        # more pressure; else demoting frees room, room invites promotion, and the two
        # alternate (each move reading or writing the spill tier).
        shallower = live_unit_levels(
            masses, g, min(1.0, pressure + PROMOTION_MARGIN), seq.num_computed_tokens
        )
        moves = 0
        for u, (down, up) in enumerate(zip(deeper, shallower, strict=True)):
            current = st.units[u].level if u in st.units else Level.L0
            level = min(down, Level.L2)  # a live sequence reads every unit every step
            if level <= current:
                level = max(min(up, Level.L2), min(level, current))
            if level == current:
                continue
            if level == Level.L0:
                if not self.promote(seq, u, ub):
                    continue
            else:
                self.demote(seq, u, ub, level)
            moves += 1
        return moves

    def demote(self, seq: Sequence, u: int, ub: int, level: Level) -> None:
        st = self.state(seq)
        data = self._unit_data(seq, u, ub)  # [L, 2, T, H, D], the best copy we have
        if u not in st.units:
            # first demotion: keep the bit-exact original on disk so promotion is lossless
            nbytes = self.spill.put(self._key(seq, u), data)
            st.originals[u] = nbytes
            self.spill_bytes += nbytes
            self.counters.spills += 1
        key_bits, value_bits = self.profile_for(seq).level_bits(level)
        qb = quantize_block(data, key_bits, value_bits=value_bits)
        unit = Unit(level, 0, qb.num_bytes, value_bits)
        unit.slot = self._pool(unit.pool).put(qb)
        if u in st.units:
            self._drop_unit(st.units.pop(u))
        else:
            blocks = seq.block_table[u * ub : (u + 1) * ub]
            self.block_pool.free(blocks)
            seq.block_table[u * ub : (u + 1) * ub] = [HOLE] * ub
        st.units[u] = unit
        self.block_pool.extra_bytes += qb.num_bytes
        self.counters.demotions += 1

    def promote(self, seq: Sequence, u: int, ub: int) -> bool:
        """Back to L0, bit-identical to before the first demotion; False if no room."""
        st = self.state(seq)
        unit = st.units[u]
        if not self.block_pool.can_allocate(ub):
            return False
        data = self._unit_data(seq, u, ub)
        blocks = self.block_pool.allocate(ub)
        self._drop_unit(st.units.pop(u))
        bs = self.block_size
        view = data.view(data.shape[0], 2, ub, bs, *data.shape[3:])
        self.kv_cache[:, :, blocks] = view.to(self.kv_cache.dtype)
        seq.block_table[u * ub : (u + 1) * ub] = blocks
        self.counters.promotions += 1
        del unit
        return True

    def _unit_data(self, seq: Sequence, u: int, ub: int) -> torch.Tensor:
        """The best copy of unit `u`: its original if one was spilled, else its L0 blocks,
        else (a unit that arrived quantized, e.g. from the store) its dequantized values."""
        st = self.state(seq)
        if u in st.originals:
            return self.spill.get(self._key(seq, u))
        if u in st.units:
            unit = st.units[u]
            return dequantize_block(self.pools[unit.pool].get(unit.slot))
        blocks = seq.block_table[u * ub : (u + 1) * ub]
        data = self.kv_cache[:, :, blocks]  # [L, 2, ub, bs, H, D]
        return data.reshape(data.shape[0], 2, ub * self.block_size, *data.shape[4:])

    def relieve(self, seqs: list[Sequence], blocks_needed: int) -> bool:
        """Out of room: demote until `blocks_needed` fit, before the scheduler would
        preempt or refuse. Importance no longer decides *whether*, only the profile's
        pinned sinks and window are spared: first every other unit to L1, then (where the
        profile allows) to L2, longest sequences first."""
        for ceiling in (Level.L1, Level.L2):
            for seq in sorted(seqs, key=lambda s: -s.num_computed_tokens):
                if self.block_pool.can_allocate(blocks_needed):
                    return True
                profile = self.profile_for(seq)
                allowed = frozenset(lv for lv in profile.allowed_levels if lv <= ceiling)
                if allowed == {Level.L0}:
                    continue
                forced = dataclasses.replace(
                    profile, allowed_levels=allowed, l1_importance=math.inf,
                    l2_importance=math.inf, l1_pressure=0.0, l2_pressure=0.0,
                    spill_pressure=math.inf,
                )  # fmt: skip
                self._rebalance_seq(seq, forced, pressure=1.0)
        return self.block_pool.can_allocate(blocks_needed)

    # --- attention --------------------------------------------------------------------
    def plan(self, seqs: list[Sequence]) -> StagedPlan | None:
        rows: dict[PoolKey, list[int]] = {k: [] for k in self.pools}
        starts: dict[PoolKey, list[int]] = {k: [] for k in self.pools}
        slots: dict[PoolKey, list[int]] = {k: [] for k in self.pools}
        unit_tokens = 0
        for i, seq in enumerate(seqs):
            st = self.states.get(seq.req_id)
            if st is None or not st.units:
                continue
            unit_tokens = self.ub * self.block_size
            for u, unit in st.units.items():
                rows[unit.pool].append(i)
                starts[unit.pool].append(u * unit_tokens)
                slots[unit.pool].append(unit.slot)
        if not unit_tokens:
            return None
        as_t = lambda d: {lv: torch.tensor(v, dtype=torch.long) for lv, v in d.items() if v}  # noqa: E731
        plan = StagedPlan(self.pools, as_t(rows), as_t(starts), as_t(slots), unit_tokens)
        plan.compact = self._compact(seqs)
        return plan

    def _compact(self, seqs: list[Sequence]) -> CompactPlan:
        """Per sequence, its L0 blocks and its units per pool, padded to the batch's
        largest count, for decode attention (one query per sequence, context = every
        computed token plus the one being decoded)."""
        bs, ub = self.block_size, self.ub
        l0: list[list[tuple[int, int]]] = []  # (logical block, pool block)
        units: dict[PoolKey, list[list[tuple[int, int]]]] = {k: [] for k in self.pools}
        contexts = []
        for seq in seqs:
            context = seq.num_computed_tokens + 1
            contexts.append(context)
            used = -(-context // bs)
            l0.append([(i, b) for i, b in enumerate(seq.block_table[:used]) if b != HOLE])
            st = self.states.get(seq.req_id)
            held = st.units if st is not None else {}
            for key in units:
                units[key].append([(u * ub, x.slot) for u, x in held.items() if x.pool == key])
        dummy = max(-(-c // bs) for c in contexts)  # an importance column nobody reads
        n0 = max(1, max(len(x) for x in l0))
        l0_tables = torch.zeros(len(seqs), n0, dtype=torch.long)
        l0_logical = torch.full((len(seqs), n0), dummy, dtype=torch.long)
        l0_valid = torch.zeros(len(seqs), n0 * bs, dtype=torch.bool)
        for r, (blocks, context) in enumerate(zip(l0, contexts, strict=True)):
            if blocks:
                logical = torch.tensor([i for i, _ in blocks])
                l0_tables[r, : len(blocks)] = torch.tensor([b for _, b in blocks])
                l0_logical[r, : len(blocks)] = logical
                positions = logical[:, None] * bs + torch.arange(bs)[None, :]
                l0_valid[r, : len(blocks) * bs] = (positions < context).flatten()
        compact_units = {}
        for key, per_seq in units.items():
            um = max(len(x) for x in per_seq)
            if um == 0:
                continue
            slot_t = torch.zeros(len(seqs), um, dtype=torch.long)
            first = torch.full((len(seqs), um), dummy, dtype=torch.long)
            valid = torch.zeros(len(seqs), um, dtype=torch.bool)
            for r, held in enumerate(per_seq):
                for j, (first_block, slot) in enumerate(held):
                    slot_t[r, j], first[r, j], valid[r, j] = slot, first_block, True
            compact_units[key] = CompactUnits(slot_t, first, valid)
        return CompactPlan(l0_tables, l0_logical, l0_valid, compact_units, dummy + 1)
