"""A stream survives its decode replica's death (`deployments/resumable_stream.py`), and the
scheduler reroutes to a live replica (`SchedulerActor.reroute`). The real `DecodeMux` and
scheduler state; the decode deployment is a fake that "generates" token n+1 after token n,
so a resumed stream must continue exactly after what the client already received."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from deployments.decode_mux import DecodeMux
from deployments.resumable_stream import ResumableStream
from deployments.scheduler import SchedulerActor
from serving.api.errors import Unavailable
from serving.config import InferosConfig
from serving.engine.sampling_params import SamplingParams
from serving.messages import DecodeRequest, ReplicaLoad, Role, RoutePlan, TokenDelta

PROMPT = [10, 11, 12]


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeDecode:
    """Decode replicas that emit one token per tick (the last token + 1), a chunk of
    `interval` at a time; `kill(replica)` ends that replica's stream with an error, and
    tokens it held back are lost, as a real replica's are."""

    def __init__(self, replicas: list[str], interval: int = 2, max_tokens: int = 12):
        self.alive = set(replicas)
        self.interval, self.max_tokens = interval, max_tokens
        self.streams: dict[str, asyncio.Queue] = {}
        self.submitted: list[tuple[str, DecodeRequest]] = []
        self.submit = _Remote(self._submit)
        self.stream = _Remote(self._stream)

    def options(self, **_) -> FakeDecode:
        return self

    async def _submit(self, req: DecodeRequest, replica_id: str) -> str | None:
        if replica_id not in self.alive:
            return f"request for decode replica {replica_id} reached another"
        self.submitted.append((replica_id, req))
        asyncio.get_running_loop().create_task(self._generate(req, replica_id))
        return None

    async def _generate(self, req: DecodeRequest, replica: str) -> None:
        done = list(req.resume_token_ids) or (
            [req.first_token_id] if req.first_token_id is not None else []
        )
        held: list[int] = []
        while len(done) < self.max_tokens and replica in self.alive:
            await asyncio.sleep(0.001)
            done.append((done[-1] if done else PROMPT[-1]) + 1)
            held.append(done[-1])
            last = len(done) == self.max_tokens
            if len(held) >= self.interval or last:
                reason = "length" if last else None
                delta = TokenDelta(req.req_id, held, last, reason)
                self.streams[replica].put_nowait([delta])
                held = []

    async def _stream(self, subscriber: str, replica_id: str) -> AsyncIterator[list]:
        queue = self.streams.setdefault(replica_id, asyncio.Queue())
        yield []
        while True:
            batch = await queue.get()
            if batch is None:
                raise RuntimeError(f"replica {replica_id} died")
            yield batch

    def kill(self, replica: str) -> None:
        self.alive.discard(replica)
        self.streams[replica].put_nowait(None)


class FakeScheduler:
    def __init__(self, actor: SchedulerActor):
        self.actor = actor
        self.reroute = _Remote(actor.reroute)
        self.forget = _Remote(actor.forget)


def _scheduler(*decode: str) -> SchedulerActor:
    actor = SchedulerActor(InferosConfig().model_dump())
    for rid in decode:
        asyncio.run(actor.report(ReplicaLoad(Role.DECODE, rid, 0, 0, 0.0, 0.0)))
    return actor


def _request(first_token: int | None = None) -> DecodeRequest:
    return DecodeRequest("r1", PROMPT, first_token, SamplingParams(max_tokens=12), None, "ing")


async def _within(awaitable):
    return await asyncio.wait_for(awaitable, 10)


def _stream(decode, actor, replica, request=None, max_resumes=2, wait_s=5.0):
    mux = DecodeMux(decode, "ing", FakeScheduler(actor).forget.remote)
    return ResumableStream(
        request or _request(),
        replica,
        mux,
        decode,
        FakeScheduler(actor),
        _within,
        "session-1",
        wait_s,
        max_resumes,
    )


async def _read(stream: ResumableStream, kill_after: int | None, decode: FakeDecode):
    tokens: list[int] = []
    reasons = []
    async for delta in stream:
        tokens += delta.token_ids
        reasons.append(delta.finish_reason)
        if kill_after is not None and len(tokens) >= kill_after and stream.num_resumes == 0:
            decode.kill(stream.replica)
            kill_after = None
    return tokens, reasons


def test_a_stream_continues_on_another_replica_after_what_the_client_has() -> None:
    decode = FakeDecode(["d1", "d2"])
    actor = _scheduler("d1", "d2")
    asyncio.run(actor.route("r1", len(PROMPT), "session-1"))
    victim = actor.assignments["r1"][1]
    stream = _stream(decode, actor, victim)
    tokens, reasons = asyncio.run(_read(stream, 4, decode))
    assert tokens == list(range(13, 25))  # 12 tokens, none repeated, none missing
    assert reasons[-1] == "length" and "replica_lost" not in reasons
    assert stream.num_resumes == 1 and stream.replica != victim
    resumed_on, resumed = decode.submitted[-1]
    assert resumed_on == stream.replica
    assert resumed.resume_token_ids == tokens[: len(resumed.resume_token_ids)]
    assert resumed.first_token_id is None and resumed.kv_key is None
    # the scheduler forgot the dead replica and moved the request and its session
    assert victim not in actor.replicas[Role.DECODE]
    assert actor.assignments["r1"] == (None, stream.replica)
    assert actor.sessions["session-1"] == stream.replica
    assert actor.replicas[Role.DECODE][stream.replica].num_assigned == 1


def test_after_a_prefill_replica_the_first_token_is_part_of_what_was_sent() -> None:
    decode = FakeDecode(["d1", "d2"])
    actor = _scheduler("d1", "d2")
    stream = _stream(decode, actor, "d1", _request(first_token=13))
    tokens, _ = asyncio.run(_read(stream, 3, decode))
    assert [13, *tokens] == list(range(13, 25))
    assert decode.submitted[-1][1].resume_token_ids[0] == 13


def test_it_waits_for_a_replica_to_come_back() -> None:
    decode = FakeDecode(["d1"])
    actor = _scheduler("d1")

    async def run() -> list[int]:
        stream = _stream(decode, actor, "d1")

        async def restart_later() -> None:  # Serve brings up a new replica
            while "d1" in decode.alive:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.7)
            decode.alive.add("d1-new")
            await actor.report(ReplicaLoad(Role.DECODE, "d1-new", 0, 0, 0.0, 0.0))

        restart = asyncio.create_task(restart_later())
        tokens, _ = await _read(stream, 2, decode)
        await restart
        assert stream.replica == "d1-new"
        return tokens

    assert asyncio.run(run()) == list(range(13, 25))


def test_no_replica_within_the_wait_is_a_503_not_a_hang() -> None:
    decode = FakeDecode(["d1"])
    actor = _scheduler("d1")
    stream = _stream(decode, actor, "d1", wait_s=0.6)
    with pytest.raises(Unavailable, match="failover_wait_s"):
        asyncio.run(_read(stream, 2, decode))


def test_resumes_are_bounded_so_a_request_cannot_kill_every_replica() -> None:
    decode = FakeDecode(["d1", "d2", "d3"])
    actor = _scheduler("d1", "d2", "d3")

    async def run() -> None:
        stream = _stream(decode, actor, "d1", max_resumes=1)
        async for _delta in stream:  # the request kills each replica it reaches
            decode.kill(stream.replica)

    with pytest.raises(Unavailable, match="decode failed"):
        asyncio.run(run())
    assert len(decode.alive) == 1  # the third replica was never reached


def test_reroute_moves_the_assignment_without_counting_an_error() -> None:
    actor = _scheduler("d1", "d2")
    plan = asyncio.run(actor.route("r1", 3))
    other = asyncio.run(actor.reroute("r1", None, plan.decode_replica))
    assert isinstance(other, RoutePlan) and other.decode_replica != plan.decode_replica
    assert other.prefill_replica is None
    assert plan.decode_replica not in actor.replicas[Role.DECODE]
    asyncio.run(actor.finished("r1"))
    assert actor.replicas[Role.DECODE][other.decode_replica].num_assigned == 0
    assert asyncio.run(actor.reroute("r2", None, other.decode_replica)) is None


def test_an_error_raised_inside_a_live_replica_does_not_mark_it_lost() -> None:
    """The kv_store restarting makes a live replica's submit raise a RayTaskError whose cause
    is an ActorUnavailableError, which Ray makes an instance of RayActorError too: the replica
    refused this once and stays in the scheduler's routing (seen in CI: the live replicas were
    forgotten and no request succeeded for 120 s)."""
    from ray.exceptions import ActorUnavailableError, RayTaskError

    decode = FakeDecode(["d1"])
    actor = _scheduler("d1")
    real_submit = decode.submit.remote
    failures = [1]

    async def flaky_submit(req: DecodeRequest, replica_id: str) -> str | None:
        if failures:
            failures.pop()
            cause = ActorUnavailableError("the kv_store is restarting", None)
            raise RayTaskError("submit", "traceback", cause).as_instanceof_cause()
        return await real_submit(req, replica_id)

    decode.submit = _Remote(flaky_submit)

    async def run() -> list[int]:
        tokens, _ = await _read(_stream(decode, actor, "d1"), None, decode)
        return tokens

    assert asyncio.run(run()) == list(range(13, 25))
    assert "d1" in actor.replicas[Role.DECODE]
