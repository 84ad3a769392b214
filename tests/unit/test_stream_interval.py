"""The decode replica's stream interval: the operator's where set, else by the batch (every
step for a few streams, up to 8 steps at 32 and more)."""

from __future__ import annotations

from deployments.stream_interval import AUTO_MAX_STEPS, stream_interval
from serving.config import InferosConfig


def test_a_configured_interval_is_kept_at_any_load() -> None:
    assert [stream_interval(3, running) for running in (1, 8, 64)] == [3, 3, 3]


def test_by_load_a_few_streams_get_every_token_and_32_get_chunks_of_8() -> None:
    got = {running: stream_interval(None, running) for running in (0, 1, 7, 8, 16, 32, 64)}
    assert got == {0: 1, 1: 1, 7: 1, 8: 2, 16: 4, 32: AUTO_MAX_STEPS, 64: AUTO_MAX_STEPS}


def test_the_default_config_streams_by_load() -> None:
    assert InferosConfig().scheduling.stream_interval is None
