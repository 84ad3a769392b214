"""The KV store's logic (`serving.kv.store.KVStore`) without Ray: objects live in a dict.

Budgets (memory: demote then spill; disk: evict), what stays (sessions' latest turn,
re-used prefixes, a TTL for the rest), the prefix index pruned with the entries, a full
disk answered by eviction, clean-up at close, and the profile pushed by the scheduler.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from serving.config import KVCacheSettings
from serving.kv.block_format import KVLayout, KVPayload
from serving.kv.spill_dir import PREFIX, SpillDirectory, _host_tag
from serving.kv.store import KVStore
from serving.metrics import StoreMetrics

BS = 16
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=BS, dtype="float32")
BLOCK_BYTES = LAYOUT.bytes_per_block()  # 1 KiB
BLOCKS = 4  # per sequence
SEQ_BYTES = BLOCKS * BLOCK_BYTES


class LocalObjects:
    """`ObjectStore` in a dict: refs are ints."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}

    def put(self, value: Any) -> int:
        ref = len(self.objects) + 1
        self.objects[ref] = value
        return ref

    async def get(self, ref: int) -> Any:
        return self.objects[ref]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, s: float = 1.0) -> None:
        self.now += s


def make_store(tmp_path: Path, writer: Callable | None = None, **settings: Any) -> KVStore:
    defaults: dict[str, Any] = {
        "store_budget_bytes": 2 * SEQ_BYTES,
        "spill_budget_bytes": 100 * SEQ_BYTES,
        "spill_dir": str(tmp_path / "spill"),
        "quant_unit_tokens": 2 * BS,
    }
    kv = KVCacheSettings.model_validate(defaults | settings)
    return KVStore(kv, LocalObjects(), StoreMetrics("test"), writer=writer, clock=Clock())


def tokens(seed: int, n: int = BLOCKS * BS) -> list[int]:
    return [seed * 100_000 + i for i in range(n)]


def blocks(seed: int, n: int = BLOCKS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.block_shape(), generator=g) for _ in range(n)]


def put(
    store: KVStore, key: str, seed: int, token_ids: list[int] | None = None, producer: str = "p"
) -> None:
    data = blocks(seed, len(token_ids) // BS if token_ids else BLOCKS)
    refs = [store.objects.put(b) for b in data]
    payload = KVPayload(LAYOUT, len(refs) * BS, refs)
    run(store.put(key, payload, producer, token_ids if token_ids is not None else tokens(seed)))
    store.clock.tick()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def read(store: KVStore, payload: KVPayload) -> list[torch.Tensor]:
    return [store.objects.objects[r] for r in payload.blocks]


def spill_files(store: KVStore) -> list[Path]:
    return sorted(store.spill.directory.glob("*"))


def assert_consistent(store: KVStore) -> None:
    """The index points only at live entries and holds no more hashes than their blocks;
    the disk holds what the entries account for, within budget."""
    assert store.index.keys() <= set(store.entries)
    assert len(store.index) <= sum(len(e.hashes) for e in store.entries.values())
    assert store.disk_bytes <= store.spill_budget_bytes
    on_disk = sum(p.stat().st_size for p in spill_files(store))
    assert on_disk == store.disk_bytes


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KVStore]:
    s = make_store(tmp_path)
    yield s
    run(s.close())


def test_memory_budget_spills_least_recently_used_and_reload_is_bit_exact(store) -> None:
    for i in range(3):
        put(store, f"s{i}", i)
    assert store.num_bytes <= store.budget_bytes
    assert store.lookup("s0")["spilled"] and not store.lookup("s2")["spilled"]
    assert store.disk_bytes > 0
    got = run(store.get("s0", "d"))  # reloaded from disk; now s1 is the oldest in memory
    assert all(torch.equal(a, b) for a, b in zip(read(store, got), blocks(0), strict=True))
    assert store.lookup("s1")["spilled"] and not store.lookup("s0")["spilled"]
    assert store.num_reloads == 1
    assert_consistent(store)


def test_disk_budget_evicts_the_oldest_spilled_and_never_reused_first(tmp_path) -> None:
    # memory holds 2 sequences, disk about 3: of 8 puts the store keeps 5
    store = make_store(tmp_path, spill_budget_bytes=3 * SEQ_BYTES + 2048)
    put(store, "s0", 0)
    shared = tokens(0) + tokens(99, BS)  # a prompt that starts with s0: a re-use
    assert run(store.match_prefix(shared, BS, "d")).num_tokens == BLOCKS * BS
    for i in range(1, 8):
        put(store, f"s{i}", i)
        assert store.disk_bytes <= store.spill_budget_bytes
        assert_consistent(store)
    kept = set(store.entries)
    assert "s0" in kept  # re-used: outlives newer never re-used ones
    assert {"s6", "s7"} <= kept  # in memory
    assert "s1" not in kept and "s2" not in kept  # the oldest spilled went first
    assert store.num_evictions == 8 - len(kept)
    assert store.metrics.evictions._value.get() == store.num_evictions
    run(store.close())


def test_the_prefix_index_never_points_at_a_dropped_entry(tmp_path) -> None:
    store = make_store(tmp_path, spill_budget_bytes=2 * SEQ_BYTES + 1024)
    for i in range(12):
        put(store, f"s{i}", i)
        assert_consistent(store)
    dropped = [i for i in range(12) if f"s{i}" not in store.entries]
    assert dropped
    for i in dropped:  # their prompts find nothing now (no KeyError, no stale hit)
        assert run(store.match_prefix(tokens(i) + [1], BS, "d")) is None
    assert len(store.index) == sum(len(e.hashes) for e in store.entries.values())
    run(store.drop("s11"))
    assert "s11" not in store.index.keys()
    assert_consistent(store)
    run(store.close())


def test_a_lost_producers_entries_are_dropped_and_no_prefix_finds_them(store) -> None:
    """Ray's objects die with the process that put them: a dead replica's entries could
    only fail their readers."""
    put(store, "dead-1", 1, producer="decode-a")
    put(store, "alive", 2, producer="decode-b")
    assert run(store.drop_producer("decode-a")) == 1
    assert run(store.match_prefix(tokens(1) + [1], BS, "d")) is None
    assert run(store.match_prefix(tokens(2) + [1], BS, "d")) is not None
    assert run(store.drop_producer("decode-a")) == 0
    assert_consistent(store)


def test_a_prefix_two_entries_share_survives_dropping_one(store) -> None:
    base = tokens(1)
    put(store, "a", 1, base)
    put(store, "b", 2, base[: 2 * BS] + tokens(2, 2 * BS))  # shares a's first 2 blocks
    run(store.drop("b"))  # b was the newest holder of the shared blocks
    hit = run(store.match_prefix(base[: 2 * BS] + [7], BS, "d"))
    assert hit is not None and hit.num_tokens == 2 * BS
    assert store.lookup("a")["num_hits"] == 1


def test_a_prefix_no_longer_than_the_consumers_own_is_no_hit(store) -> None:
    base = tokens(1)
    put(store, "a", 1, base)
    prompt = base[: 2 * BS] + [7]
    assert run(store.match_prefix(prompt, BS, "d", longer_than=2 * BS)) is None
    assert store.lookup("a")["num_hits"] == 0  # the engine's own cache served it
    hit = run(store.match_prefix(prompt, BS, "d", longer_than=BS))
    assert hit is not None and hit.num_tokens == 2 * BS
    assert store.lookup("a")["num_hits"] == 1


def test_a_later_turn_releases_the_earlier_one_but_not_an_unread_handoff(store) -> None:
    turn1 = tokens(1, 2 * BS)
    put(store, "turn-1", 1, turn1)
    turn2 = turn1 + tokens(2, 2 * BS)
    assert run(store.match_prefix(turn2, BS, "d")) is not None  # turn 2 re-uses turn 1
    put(store, "turn-2", 2, turn2)
    assert "turn-1" not in store.entries  # everything it held, turn-2 holds
    assert store.num_released == 1
    # two identical prompts prefilled at once: the first's KV is still to be read
    put(store, "kv-a", 3, tokens(3))
    put(store, "kv-b", 3, tokens(3))
    assert "kv-a" in store.entries
    assert run(store.get("kv-a", "d")) is not None
    assert_consistent(store)


def test_idle_sequences_expire_unless_a_prompt_reused_them(tmp_path) -> None:
    store = make_store(tmp_path, store_ttl_s=60)
    put(store, "reused", 1)
    put(store, "idle", 2)
    assert run(store.match_prefix(tokens(1) + [5], BS, "d")) is not None
    store.clock.tick(61)
    put(store, "fresh", 3)
    assert set(store.entries) == {"reused", "fresh"}
    assert store.num_released == 1 and store.num_evictions == 0
    assert_consistent(store)
    run(store.close())


def _failing_writer(times: int) -> Callable:
    """A writer the disk refuses `times` times (ENOSPC, after a partial write), then takes."""
    calls = {"n": 0}

    def write(tensors: dict[str, torch.Tensor], path: str) -> None:
        calls["n"] += 1
        if calls["n"] <= times:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        save_file(tensors, path)

    return write


def test_a_full_disk_drops_the_sequence_with_a_warning_never_an_error(tmp_path, caplog) -> None:
    store = make_store(tmp_path, writer=_failing_writer(10**9))
    caplog.set_level(logging.WARNING, logger="serving.kv.store")
    for i in range(4):
        put(store, f"s{i}", i)  # each put beyond 2 must spill, and can't
    assert set(store.entries) == {"s2", "s3"}
    assert store.num_bytes <= store.budget_bytes
    assert store.num_spill_failures >= 2 and store.num_evictions == 2
    assert "disk full" in caplog.text
    assert spill_files(store) == []  # no partial file left behind
    assert run(store.get("s0", "d")) is None  # a cache miss
    assert_consistent(store)
    run(store.close())


def test_a_full_disk_is_answered_by_evicting_spilled_sequences_then_retrying(tmp_path) -> None:
    writer_calls = {"fail_next": False}
    ok = _failing_writer(0)

    def write(tensors: dict[str, torch.Tensor], path: str) -> None:
        if writer_calls.pop("fail_next", False):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        ok(tensors, path)

    store = make_store(tmp_path, writer=write)
    for i in range(4):
        put(store, f"s{i}", i)
    assert store.lookup("s0")["spilled"] and store.lookup("s1")["spilled"]
    writer_calls["fail_next"] = True
    put(store, "s4", 4)  # spilling s2 meets a full disk: s0 is evicted, the retry succeeds
    assert "s0" not in store.entries and store.lookup("s2")["spilled"]
    assert store.num_evictions == 1
    assert_consistent(store)
    run(store.close())


def test_demotion_follows_the_pushed_profile_and_promotion_is_bit_exact(tmp_path) -> None:
    store = make_store(tmp_path, store_budget_bytes=SEQ_BYTES + SEQ_BYTES // 2)
    put(store, "a", 1)
    put(store, "b", 2)  # baseline: no lossy level, so "a" is spilled whole
    assert store.lookup("a")["spilled"]
    run(store.get("a", "d"))  # back in memory, "b" spilled
    store.set_profile("safe")
    with pytest.raises(ValueError):
        store.set_profile("reckless")
    put(store, "c", 3)  # "a" (oldest in memory) is demoted to INT8 instead of spilled
    info = store.lookup("a")
    assert "L1" in info["levels"] and not info["spilled"] and info["disk_bytes"] > 0
    assert store.counts["demoted_blocks"] > 0
    run(store.drop("c"))  # room for "a" at full precision again
    assert run(store.promote("a"))
    got = read(store, run(store.get("a", "d")))
    assert all(torch.equal(x, y) for x, y in zip(got, blocks(1), strict=True))
    assert_consistent(store)
    run(store.close())


def test_close_removes_only_what_the_store_wrote(tmp_path) -> None:
    user_dir = tmp_path / "spill"
    user_dir.mkdir()
    (user_dir / "someone-elses.txt").write_text("keep me")
    store = make_store(tmp_path)
    for i in range(4):
        put(store, f"s{i}", i)
    own = store.spill_dir.path
    assert own.parent == user_dir and spill_files(store)
    run(store.close())
    run(store.close())  # idempotent
    assert not own.exists()
    assert sorted(p.name for p in user_dir.iterdir()) == ["someone-elses.txt"]
    assert store.stats()["num_sequences"] == 0
    put(store, "late", 9)  # a put racing the shutdown is ignored, not an error
    assert not own.exists()


def test_a_new_store_removes_spill_directories_of_dead_processes(tmp_path) -> None:
    tag = _host_tag()
    dead_pid = 2**22 + 12345  # above pid_max on Linux: never alive
    stale = tmp_path / f"{PREFIX}{dead_pid}-{tag}-abc"
    live = tmp_path / f"{PREFIX}{os.getppid()}-{tag}-def"
    other_host = tmp_path / f"{PREFIX}{dead_pid}-00000000-ghi"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "x.safetensors").write_bytes(b"x")
    spill_dir = SpillDirectory(tmp_path)
    assert not stale.exists()
    assert live.exists() and other_host.exists()
    assert spill_dir.path.name.startswith(f"{PREFIX}{os.getpid()}-{tag}-")
    path = spill_dir.path
    del spill_dir  # collected: the finalizer removes it too (a store that never closed)
    assert not path.exists()


def test_the_scheduler_pushes_the_profile_and_the_store_never_calls_up(monkeypatch) -> None:
    import deployments.kv_store as kv_store_module
    import deployments.scheduler as scheduler_module
    import serving.kv.store
    from serving.config import InferosConfig

    pushed: list[str] = []

    class FakeStore:
        class set_profile:  # noqa: N801 - mimics an actor method's `.remote`
            @staticmethod
            def remote(name: str) -> None:
                pushed.append(name)

        class set_delta_ppl_estimate:  # noqa: N801
            @staticmethod
            def remote(estimate: float) -> None:
                pass

    monkeypatch.setattr(scheduler_module.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(scheduler_module, "kv_store_actor", lambda config: FakeStore)
    cfg = InferosConfig.model_validate({"kv_cache": {"profile": "balanced"}}).model_dump()
    sched = scheduler_module.SchedulerActor(cfg)
    assert pushed == ["balanced"]  # once at start
    run(sched.set_policy({"kv_profile": "safe"}))
    run(sched.set_policy({"pd_mode": "colocated"}))  # no KV change: nothing pushed
    assert pushed == ["balanced", "safe"]
    actor_source = inspect.getsource(kv_store_module)
    # the store imports only the singletons' names (actors.py), never the scheduler
    assert "scheduler_actor" not in actor_source and "deployments.scheduler" not in actor_source
    assert "import ray" not in inspect.getsource(serving.kv.store)  # plain, testable class
