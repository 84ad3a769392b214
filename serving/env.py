"""Every environment variable Infer-OS Serve reads, typed, in one place."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def inferos_home() -> Path:
    """Cache root for converted models, spill files and benchmark output."""
    return Path(os.environ.get("INFEROS_HOME", Path.home() / ".cache" / "inferos")).expanduser()


def default_model_dir() -> Path:
    return inferos_home() / "models" / DEFAULT_MODEL_NAME


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, where WikiText-2 lives (never committed here)."""
    override = os.environ.get("INFEROS_SHARED_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def wikitext_path() -> Path:
    return shared_data_dir() / "wikitext2-dev.txt"


def config_path() -> str | None:
    """YAML config for `deployments.serve_entry:app` (KubeRay / `serve run`)."""
    return os.environ.get("INFEROS_CONFIG") or None


def admin_token() -> str | None:
    """Token guarding the control API (`--admin-token` / `server.admin_token` win over it)."""
    return os.environ.get("INFEROS_ADMIN_TOKEN") or None


def api_key() -> str | None:
    """API key required on the API's routes (`--api-key` / `server.api_key` win over it)."""
    return os.environ.get("INFEROS_API_KEY") or None


def ray_address() -> str | None:
    """An existing Ray cluster to join (`inferos serve`); unset = start a local one."""
    return os.environ.get("RAY_ADDRESS") or None
