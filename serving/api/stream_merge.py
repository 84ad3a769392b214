"""Several async streams as one (the n choices of a streamed request, as they come)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")
_ENDED = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of all `streams` in the order they arrive; ends when every stream has ended.
    An exception in one stream ends the merge with it and cancels the others; closing the
    merge (a client going away) cancels them all. The queue holds one item per stream, so
    a slow reader slows the streams rather than buffering them."""
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue(len(streams))

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((item, None))
        except Exception as e:  # handed to the reader; cancellation is not caught
            await queue.put((None, e))
            return
        await queue.put((_ENDED, None))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _ENDED:
                running -= 1
                continue
            yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
