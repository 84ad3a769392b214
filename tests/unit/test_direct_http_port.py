"""`deployments.direct_http.free_port`: a free port that no bind to port 0 can be handed
before its user binds it, i.e. outside the kernel's ephemeral range and Ray's worker ports
(a port from the ephemeral range was once taken by the new Ray cluster of the very
`inferos serve` it was meant for)."""

from __future__ import annotations

import socket

from deployments.direct_http import RAY_WORKER_PORTS_END, ephemeral_port_range, free_port


def test_free_port_is_outside_the_ephemeral_range_and_ray_worker_ports() -> None:
    low, high = ephemeral_port_range()
    for _ in range(50):
        port = free_port("127.0.0.1")
        assert not low <= port <= high and port >= RAY_WORKER_PORTS_END, port
        with socket.socket() as s:  # and it is free
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_skipped(monkeypatch) -> None:
    """The first pick is taken: the next free one is returned."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy + 1 if busy < 65535 else busy - 1])
        monkeypatch.setattr("deployments.direct_http.random.randrange", lambda a, b: next(picks))
        assert free_port("127.0.0.1") != busy
