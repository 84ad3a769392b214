"""Prefill deployment: runs prompts, samples the first token, puts the prompt's KV blocks
into the object store and registers them with the `kv_store` actor."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.engine_replica import EngineReplica
from serving.engine.engine import StepOutput
from serving.engine.sequence import Sequence
from serving.messages import PrefillRequest, PrefillResult, Role


class PrefillServer(EngineReplica):
    role = Role.PREFILL

    async def __init__(self, config: dict):
        self._pending: dict[str, asyncio.Future[StepOutput]] = {}
        await self._start_engine(config)
        self.num_prefills = 0
        self.num_prompt_tokens = 0

    def _on_outputs(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            fut = self._pending.pop(out.req_id, None)
            if fut is not None and not fut.done():
                fut.set_result(out)

    async def prefill(self, req: PrefillRequest, replica_id: str | None = None) -> PrefillResult:
        fut: asyncio.Future[StepOutput] = asyncio.get_running_loop().create_future()
        self._pending[req.req_id] = fut
        self.thread.set_num_threads(req.num_threads or self.default_threads)
        seq = Sequence(req.req_id, list(req.prompt_token_ids), req.params, export_kv=True)
        error = await self._constrain(seq)
        if error is not None:
            self._pending.pop(req.req_id, None)
            return PrefillResult(req.req_id, None, True, "error", None, 0, self.replica_id, error)
        seq.kv_import = await self._cached_prefix(seq.prompt_token_ids)
        self.thread.add(seq)
        try:
            out = await fut
        except asyncio.CancelledError:
            self._pending.pop(req.req_id, None)
            self.thread.abort(req.req_id)
            raise
        self.num_prefills += 1
        self.num_prompt_tokens += len(req.prompt_token_ids)
        if out.error is not None:
            return PrefillResult(
                req.req_id, None, True, "error", None, 0, self.replica_id, out.error
            )
        kv_key = None
        num_blocks = 0
        if not out.finished and out.kv_export is not None:
            kv_key = f"kv-{req.req_id}"
            payload = await self._store(kv_key, out.kv_export, list(req.prompt_token_ids))
            num_blocks = payload.num_blocks
        return PrefillResult(
            req_id=req.req_id,
            first_token_id=out.new_token_ids[0],
            finished=out.finished,
            finish_reason=out.finish_reason,
            kv_key=kv_key,
            num_kv_blocks=num_blocks,
            replica_id=self.replica_id,
            logprobs=out.logprobs,
            prompt_logprobs=out.prompt_logprobs,
        )

    async def stats(self) -> dict:
        return await super().stats() | {
            "num_prefills": self.num_prefills,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_reused_tokens": self.num_reused_tokens,
            "num_computed_prompt_tokens": self.num_prompt_tokens - self.num_reused_tokens,
        }


PrefillDeployment = serve.deployment(PrefillServer, name="prefill")
