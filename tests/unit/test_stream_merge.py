"""`merge`: n streamed choices as one stream, every item once, errors and closing end all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.api.stream_merge import merge


async def _stream(name: str, n: int, delay: float, log: list[str]) -> AsyncIterator[str]:
    try:
        for i in range(n):
            await asyncio.sleep(delay)
            yield f"{name}{i}"
    finally:
        log.append(f"{name} closed")


def test_every_item_of_every_stream_comes_once_interleaved() -> None:
    async def run() -> list[str]:
        log: list[str] = []
        streams = [_stream("a", 5, 0.01, log), _stream("b", 3, 0.015, log)]
        return [item async for item in merge(streams)]

    items = asyncio.run(run())
    assert sorted(items) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)])
    assert [i for i in items if i[0] == "a"] == [f"a{i}" for i in range(5)]  # order kept
    assert items.index("b0") < items.index("a4")  # not one stream after the other


def test_an_error_in_one_stream_ends_the_merge_and_closes_the_others() -> None:
    log: list[str] = []

    async def failing() -> AsyncIterator[str]:
        yield "x0"
        await asyncio.sleep(0.02)
        raise ValueError("choice failed")

    async def run() -> list[str]:
        got = []
        async for item in merge([failing(), _stream("a", 100, 0.01, log)]):
            got.append(item)
        return got

    with pytest.raises(ValueError, match="choice failed"):
        asyncio.run(run())
    assert log == ["a closed"]


def test_closing_the_merge_closes_every_stream() -> None:
    log: list[str] = []

    async def run() -> None:
        merged = merge([_stream("a", 100, 0.01, log), _stream("b", 100, 0.01, log)])
        async for _ in merged:
            break
        await merged.aclose()

    asyncio.run(run())
    assert sorted(log) == ["a closed", "b closed"]
