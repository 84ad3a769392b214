"""Ray Serve autoscaling settings pass through the config, validated by Ray's own model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.app import replicas
from serving.config import InferosConfig


def test_autoscaling_passes_through_and_replaces_the_fixed_count() -> None:
    cfg = InferosConfig.model_validate(
        {"decode": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                           "target_ongoing_requests": 16}}}
    )  # fmt: skip
    assert replicas(cfg.decode) == {
        "num_replicas": "auto",
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    }
    assert replicas(cfg.prefill) == {"num_replicas": 1}


def test_a_bad_autoscaling_config_is_refused_naming_the_role() -> None:
    with pytest.raises(ValidationError, match="decode.autoscaling_config"):
        InferosConfig.model_validate(
            {"decode": {"autoscaling_config": {"min_replicas": 5, "max_replicas": 2}}}
        )
    with pytest.raises(ValidationError, match="prefill.autoscaling_config"):
        InferosConfig.model_validate({"prefill": {"autoscaling_config": {"no_such_field": 1}}})
