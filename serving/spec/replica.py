"""What a decode replica does for speculative decoding: attach a `SpecDecodeStep` to its
engine (on the engine thread) and publish the counters as `inferos:spec_decode_*`.

The step is attached whenever the replica can speculate, even with `enabled: false`, so
`RuntimePolicy.speculation` can switch it on without a restart; switched off it costs one
attribute check per decode step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from serving.config import InferosConfig
from serving.engine.engine import LLMEngine
from serving.metrics import EngineMetrics
from serving.models.loader import parse_dtype
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.factory import build_proposer, build_spec_step
from serving.spec.remote import RemoteProposer

logger = logging.getLogger(__name__)


def attach_speculation(
    engine: LLMEngine, config: InferosConfig, target_path, draft_handle=None
) -> SpecDecodeStep | None:
    settings = config.speculation
    if settings.placement == "deployment":
        if draft_handle is None:
            logger.warning("speculation.placement=deployment but no draft deployment: off")
            return None
        proposer = RemoteProposer(draft_handle, settings.method)
    else:
        num_layers = len(engine.runner.model.layers)
        # all layers is a valid draft (the saving is then the vocabulary-slice head, and the
        # verify pass is the full LM head alone); more than the model has is clamped
        if settings.method == "truncated" and settings.num_draft_layers > num_layers:
            settings = settings.model_copy(update={"num_draft_layers": num_layers})
        proposer = build_proposer(
            settings,
            engine,
            str(target_path),
            parse_dtype(config.model_dtype),
            config.model.int4_max_tokens if config.fast_kernels else 0,
        )
    spec = build_spec_step(settings, engine, proposer)
    engine.attach_spec(spec)
    logger.info(
        "speculative decoding ready: %s, k_max %d, %s",
        proposer.name,
        settings.k_max,
        "on" if spec.enabled else "off until the run-time policy turns it on",
    )
    return spec


@dataclass(slots=True)
class SpecMetricsPusher:
    """Moves the engine thread's plain counters into Prometheus counters (deltas)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def push(self, spec: SpecDecodeStep, metrics: EngineMetrics) -> None:
        s = spec.stats
        drafts, draft_tokens, accepted = s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens
        per_pos = list(s.accepted_per_pos)
        metrics.spec_num_drafts.inc(drafts - self.num_drafts)
        metrics.spec_num_draft_tokens.inc(draft_tokens - self.num_draft_tokens)
        metrics.spec_num_accepted_tokens.inc(accepted - self.num_accepted_tokens)
        for pos, n in enumerate(per_pos):
            before = self.accepted_per_pos[pos] if pos < len(self.accepted_per_pos) else 0
            if n > before:
                metrics.spec_accepted_at(pos, n - before)
        self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens = (
            drafts,
            draft_tokens,
            accepted,
        )
        self.accepted_per_pos = per_pos
