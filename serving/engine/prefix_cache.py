"""Automatic prefix caching in one engine's pool (vLLM's `enable_prefix_caching`).

When a sequence leaves the engine, its full blocks of computed KV stay in the pool, indexed
by the hash chain of their tokens (`serving.kv.prefix`: block i's hash covers every token up
to the end of block i). A later sequence whose tokens start the same way (the next turn of a
conversation: earlier prompt and answer; a shared system prompt) shares those blocks and
computes only the rest, with no copy and no trip to the kv_store. A cached block no sequence
uses counts as free room: the pool hands it out again, least recently released first, when
it has no never-used block left (`BlockPool.retain`).

Only full blocks before a sequence's last token are shared: a sequence writes at and after
its newest token, so a shared block is never written again (no copy-on-write needed).
"""

from __future__ import annotations

from serving.engine.block_pool import BlockPool
from serving.kv.prefix import block_hashes


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self._block_of: dict[int, int] = {}  # chain hash -> pool block
        self._hash_of: dict[int, int] = {}  # pool block -> chain hash
        pool.on_evict = self._forget
        # counted in tokens, as vLLM's prefix_cache_queries / prefix_cache_hits
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self._hash_of)

    def match(self, token_ids: list[int]) -> list[int]:
        """Pool blocks holding the KV of the longest cached prefix of `token_ids`, in
        whole blocks (not yet shared: the caller `pool.share`s them before allocating)."""
        blocks: list[int] = []
        for h in block_hashes(token_ids, self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def count(self, num_queried: int, num_hit: int) -> None:
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit

    def peek_num_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` are cached now. Safe from another thread
        (dict reads only) but a hint: the engine may evict them before it admits anyone."""
        return len(self.match(token_ids)) * self.block_size

    def insert(self, token_ids: list[int], block_table: list[int]) -> None:
        """Before a sequence frees `block_table`: keep its full blocks of `token_ids` (the
        tokens whose KV it computed), up to its first block held outside the pool."""
        for h, block in zip(block_hashes(token_ids, self.block_size), block_table, strict=False):
            if block < 0:  # demoted by staged KV: the pool no longer holds it
                break
            if h in self._block_of or block in self._hash_of:
                continue  # the same KV is cached already (in this block or another)
            self._block_of[h] = block
            self._hash_of[block] = h
            self.pool.retain(block)

    def _forget(self, block: int) -> None:
        """The pool took `block` back for a new sequence."""
        del self._block_of[self._hash_of.pop(block)]
