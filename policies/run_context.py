"""What an operator tells the app about the load to expect (`POST /v1/run-context`).

Validated here, stored by the scheduler actor, returned as stored. Nothing acts on it yet:
a later policy (KV levels, speculation length, P/D split) may read it as a prior.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RunContext(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expected_seq_len: int | None = Field(
        None, gt=0, description="typical prompt + output tokens per request"
    )
    expected_batch_size: int | None = Field(
        None, gt=0, description="typical number of requests in flight at once"
    )
    target_ttft_s: float | None = Field(None, gt=0, description="time to first token to aim for")
    quality_budget: float | None = Field(
        None,
        ge=0,
        le=1,
        description="largest accepted relative perplexity increase from lossy KV "
        "(0.02 = +2 %; 0 = lossless only)",
    )
    version: int = Field(0, ge=0, description="bumped by every accepted change")

    @model_validator(mode="after")
    def _says_something(self) -> RunContext:
        fields = ("expected_seq_len", "expected_batch_size", "target_ttft_s", "quality_budget")
        if all(getattr(self, f) is None for f in fields):
            raise ValueError(f"give at least one of {', '.join(fields)}")
        return self

    def check_fits(self, max_model_len: int) -> RunContext:
        """Raises ValueError when the expected sequence cannot fit the served context."""
        if self.expected_seq_len is not None and self.expected_seq_len > max_model_len:
            raise ValueError(
                f"expected_seq_len {self.expected_seq_len} exceeds the model's context "
                f"(max_model_len {max_model_len})"
            )
        return self
