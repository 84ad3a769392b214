"""Rounds of the peer benchmark (`peer_bench.py --rounds R`): the order servers run in, and
how R rounds become one table.

On the VMs we measure on, the machine's speed swings by up to 1.8x within minutes, so one
run of each server, one after the other, compares two different machines as often as two
servers. With rounds, every server runs once per round, in alternating order (ABBA...:
each server goes first in half the rounds, so a steady drift falls on both alike); a
ratio is taken within each round, between runs minutes apart, and the table gives the
median of those paired ratios beside the median of each server's own numbers.

Standard library only, like peer_bench.py. A report is peer_bench's JSON: `rounds` is a
list of `{"order": [...], "servers": {name: side}}`; a report written before rounds
existed has only `servers`, read as one round.
"""

from __future__ import annotations

import statistics
from typing import Any


def round_order(names: list[str], round_index: int) -> list[str]:
    """Servers in the order round `round_index` (0-based) runs them: as given in even
    rounds, reversed in odd ones. A server given by URL that is not restarted still takes
    its place in the order."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def rounds_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's rounds; a single-run report (no `rounds`) as one round."""
    return report.get("rounds") or [{"servers": report.get("servers", {})}]


def run_value(side: dict[str, Any] | None, c: int, key: str) -> float | None:
    """One run's number: a `vllm bench serve` result field, or the run's peak RSS."""
    run = ((side or {}).get("runs") or {}).get(str(c)) or {}
    if key == "peak_rss_mib":
        value = (run.get("memory") or {}).get(key)
    else:
        value = (run.get("result") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def values(report: dict[str, Any], name: str, c: int, key: str) -> list[float]:
    """`name`'s number at level `c` in every round that has it."""
    found = (run_value(r["servers"].get(name), c, key) for r in rounds_of(report))
    return [v for v in found if v is not None]


def median_value(report: dict[str, Any], name: str, c: int, key: str) -> float | None:
    found = values(report, name, c, key)
    return statistics.median(found) if found else None


def round_ratios(report: dict[str, Any], peer: str, c: int, key: str) -> list[float | None]:
    """ours / peer within each round (None where either run is missing or zero)."""
    out: list[float | None] = []
    for r in rounds_of(report):
        a = run_value(r["servers"].get("ours"), c, key)
        b = run_value(r["servers"].get(peer), c, key)
        out.append(a / b if a is not None and b else None)
    return out


def paired_ratio(report: dict[str, Any], peer: str, c: int, key: str) -> float | None:
    """The median over rounds of ours / peer taken within each round."""
    found = [x for x in round_ratios(report, peer, c, key) if x is not None]
    return statistics.median(found) if found else None


def has_runs(report: dict[str, Any], name: str) -> bool:
    return any((r["servers"].get(name) or {}).get("runs") for r in rounds_of(report))
