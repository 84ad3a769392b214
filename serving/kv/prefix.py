"""Token-block hash chains: how a stored sequence's KV is found again by a later prompt.

Block i's hash covers every token up to the end of block i (it chains the previous hash),
so equal hashes mean equal prefixes, and KV computed for one prompt is valid for any other
prompt that starts with the same tokens (same model, same positions).
"""

from __future__ import annotations


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """One hash per *full* block of `token_ids`, each covering the whole prefix so far.

    Python hashes ints and tuples of ints the same way in every process (no per-process
    salt, unlike str), so replicas and the store agree."""
    hashes: list[int] = []
    h = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start : start + block_size])))
        hashes.append(h)
    return hashes
