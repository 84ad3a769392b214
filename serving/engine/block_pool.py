"""Fixed-size KV block allocator: the bookkeeping half of the paged KV pool (no tensors).

With staged KV, quantized units (held outside the pool) count against the same byte
budget through `extra_bytes`: the budget is `num_blocks` full-precision blocks, so every
byte saved by a demotion is a byte another sequence's L0 blocks may use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class NoFreeBlocks(RuntimeError):
    pass


class BlockPool:
    """Hands out block ids `0..num_blocks-1`. A block belongs to one sequence, or to several
    once `share`d (the full prompt blocks of a request's n choices, a cached prefix):
    reference-counted, it returns to the free list when its last owner frees it.

    A prefix cache (`serving.engine.prefix_cache`) may `retain` blocks: it owns them too, and
    a block only it owns is *evictable*: counted as free (a new sequence may take its room,
    the least recently released first, `on_evict` telling the cache) but kept until then."""

    def __init__(self, num_blocks: int, block_bytes: int = 0):
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.extra_bytes = 0  # quantized KV held elsewhere against this pool's budget
        # A stack, lowest id on top: recently freed blocks are reused first, so the pages
        # of a big, mostly idle pool are never touched (and never resident).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # owners beyond the first, of shared blocks only (the common case costs nothing)
        self._extra_owners: dict[int, int] = {}
        self._retained: set[int] = set()  # blocks a prefix cache owns (one reference)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # only it: oldest first
        self.on_evict: Callable[[int], None] = lambda block: None

    @property
    def budget_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_free_blocks(self) -> int:
        free = len(self._free) + len(self._evictable)
        if not self.block_bytes:
            return free
        by_bytes = (self.budget_bytes - self.used_bytes) // self.block_bytes
        return max(0, min(free, by_bytes))

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds (a cached block no sequence uses is free room)."""
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks a prefix cache retains, in use by a sequence or not."""
        return len(self._retained)

    @property
    def used_bytes(self) -> int:
        return self.num_used_blocks * self.block_bytes + self.extra_bytes

    @property
    def usage(self) -> float:
        """Fraction of the budget in use (blocks and quantized units)."""
        if not self.block_bytes:
            return self.num_used_blocks / self.num_blocks
        return self.used_bytes / self.budget_bytes

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise NoFreeBlocks(f"need {n} KV blocks, {self.num_free_blocks} free")
        while len(self._free) < n:  # the room of cached blocks nobody uses
            block, _ = self._evictable.popitem(last=False)
            self._retained.discard(block)
            self.on_evict(block)
            self._free.append(block)
        return [self._free.pop() for _ in range(n)]

    def share(self, blocks: list[int]) -> list[int]:
        """One more owner for each of `blocks` (already allocated); returns them."""
        for b in blocks:
            self._extra_owners[b] = self._extra_owners.get(b, 0) + 1
            self._evictable.pop(b, None)
        return list(blocks)

    def retain(self, block: int) -> None:
        """A prefix cache owns `block` too (a sequence's, about to be freed by it)."""
        if block not in self._retained:
            self._retained.add(block)
            self._extra_owners[block] = self._extra_owners.get(block, 0) + 1

    def num_owners(self, block: int) -> int:
        return 1 + self._extra_owners.get(block, 0)

    def free(self, blocks: list[int]) -> None:
        if not self._extra_owners:
            self._free.extend(b for b in reversed(blocks) if b >= 0)
            return
        for b in reversed(blocks):
            if b < 0:
                continue
            owners = self._extra_owners.get(b, 0)
            if owners == 0:
                self._free.append(b)
            elif owners == 1:
                del self._extra_owners[b]
                if b in self._retained:  # now only the cache's: room, kept until needed
                    self._evictable[b] = None
            else:
                self._extra_owners[b] = owners - 1
