"""The kv_store's disk on the real app: with a tiny spill budget, many requests leave the
spill directory within it (older sequences evicted, every request answered), and stopping
the app removes the store's spill directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from serving.kv.spill_dir import PREFIX
from tests.integration.conftest import MODEL, AppManager

pytestmark = pytest.mark.integration

BLOCK_BYTES_FP32 = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M, block_size 16, fp32 KV
NUM_REQUESTS = 12
WORDS = (
    "river castle market bridge abbey wool cloth road farm town harbour mill tower wall "
    "garden church square school library station"
).split()


def _prompt(i: int) -> str:
    # distinct from the first token on, so no request re-uses another's KV
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)]
    return f"Request {i}: " + " ".join(words) + ". Name one of these words."


@pytest.fixture(scope="module")
def spill_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv-spill")


@pytest.fixture(scope="module")
def tiny_disk(apps: AppManager, spill_root: Path):
    overrides = {
        "kv_cache": {
            "store_budget_bytes": 4 * BLOCK_BYTES_FP32,  # about one prompt in memory
            "spill_budget_bytes": 8 * BLOCK_BYTES_FP32,  # about two prompts on disk
            "spill_dir": str(spill_root),
        }
    }
    return apps.get(overrides)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_tiny_spill_budget_holds_and_the_directory_goes_with_the_app(
    apps: AppManager, tiny_disk, spill_root: Path
) -> None:
    client = tiny_disk.client(timeout=300)
    store = tiny_disk.kv_store()
    own_dir = Path(ray.get(store.stats.remote())["spill_dir"])
    assert own_dir.parent == spill_root and own_dir.name.startswith(PREFIX)
    budget = tiny_disk.config.kv_cache.spill_budget_bytes
    for i in range(NUM_REQUESTS):
        resp = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": _prompt(i)}],
            max_tokens=2,
            temperature=0,
        )
        assert resp.choices[0].message.content is not None
        assert resp.usage.prompt_tokens > 3 * 16
        assert _dir_bytes(own_dir) <= budget

    stats = ray.get(store.stats.remote())
    assert stats["spilled_blocks"] > 0, stats
    assert stats["num_evictions"] > 0, stats  # the disk budget was reached, and held
    assert stats["disk_bytes"] <= budget, stats
    assert _dir_bytes(own_dir) == stats["disk_bytes"]
    assert "inferos:kv_store_evictions_total" in tiny_disk.metrics_text()

    from deployments.launch import stop_app

    stop_app()
    apps.current = apps.current_key = None  # the next test module redeploys
    assert not own_dir.exists()
    assert not list(spill_root.glob(f"{PREFIX}*"))
