"""Chain hash of a block → the stored sequences holding that prefix.

Every hash lists all its holders (not only the newest), so dropping one sequence never
hides a prefix another still holds; removing a sequence removes it from every hash it was
added under, and a hash with no holder left is deleted. The index is therefore never
larger than the blocks the store holds, and never points at a dropped sequence.
"""

from __future__ import annotations


class PrefixIndex:
    def __init__(self) -> None:
        # hash → {key: blocks of that key covered by the hash}, oldest holder first
        self._holders: dict[int, dict[str, int]] = {}
        self._length: dict[str, int] = {}  # key → its indexed blocks

    def add(self, key: str, hashes: list[int]) -> None:
        self.remove(key)
        if not hashes:
            return
        self._length[key] = len(hashes)
        for n, h in enumerate(hashes, start=1):
            # newest last: a match prefers the most recently stored copy
            self._holders.setdefault(h, {})[key] = n

    def remove(self, key: str, hashes: list[int] | None = None) -> None:
        """Forget `key` under every hash it was added with (`hashes`: those hashes, if the
        caller has them; else all of them are searched)."""
        if self._length.pop(key, None) is None:
            return
        for h in hashes if hashes is not None else list(self._holders):
            holders = self._holders.get(h)
            if holders is None or holders.pop(key, None) is None:
                continue
            if not holders:
                del self._holders[h]

    def longest(self, hashes: list[int]) -> tuple[str, int] | None:
        """(key, number of blocks) of the newest holder of the longest indexed prefix."""
        best: tuple[str, int] | None = None
        for h in hashes:
            holders = self._holders.get(h)
            if not holders:
                break
            best = next(reversed(holders.items()))
        return best

    def contained_in(self, hashes: list[int]) -> list[str]:
        """Keys whose every indexed block is a prefix of `hashes` (hashes chain, so a key
        whose last hash is among them holds nothing the owner of `hashes` doesn't)."""
        out = []
        for h in hashes:
            out += [k for k, n in self._holders.get(h, {}).items() if n == self._length[k]]
        return out

    def keys(self) -> set[str]:
        return {k for holders in self._holders.values() for k in holders}

    def __len__(self) -> int:
        """Indexed hashes: bounded by the blocks of the sequences still held."""
        return len(self._holders)
