"""The policy the app runs with right now, changeable at run time through the control API.

The scheduler actor owns the one current `RuntimePolicy`; it hands it back with every
replica load report, so a change reaches every replica within one report period (0.5 s)
without a restart. Validation lives here, so a bad body is refused before anything changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

KVProfileName = Literal["baseline", "safe", "balanced", "aggressive"]
PDMode = Literal["disaggregated", "colocated", "auto"]


class RuntimePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_profile: KVProfileName = Field(
        "baseline", description="staged-KV profile for blocks without a per-request override"
    )
    kv_window: int | None = Field(
        None, ge=0, description="recent tokens kept at full precision; None = the profile's"
    )
    pd_mode: PDMode = Field("disaggregated", description="where prompts are prefilled")
    speculation: bool = Field(False, description="speculative decoding on/off")
    max_num_seqs: int | None = Field(
        None, ge=1, description="decode batch limit per replica; None = the configured one"
    )
    version: int = Field(0, ge=0, description="bumped by every accepted change")

    def updated(self, changes: dict) -> RuntimePolicy:
        """A new policy with `changes` applied; raises pydantic.ValidationError on bad input
        (unknown keys included) and leaves this one untouched."""
        if "version" in changes:
            raise ValueError("version is set by the scheduler, not by callers")
        return RuntimePolicy.model_validate(
            self.model_dump() | dict(changes) | {"version": self.version + 1}
        )
