"""The import paths KubeRay and `serve run` use build the same app as `inferos serve`."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve import Application


def test_module_level_app_and_builder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("decode: {num_replicas: 2}\n")
    monkeypatch.setenv("INFEROS_CONFIG", str(config))
    import importlib

    import deployments.serve_entry as entry

    entry = importlib.reload(entry)
    assert isinstance(entry.app, Application)
    assert isinstance(entry.app_builder({"scheduling": {"pd_mode": "colocated"}}), Application)
    with pytest.raises(ValueError):
        entry.app_builder({"no_such_section": {}})


def test_serve_run_keeps_the_proxy_on_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve run`/KubeRay start Serve's proxy on the port: the ingress must not bind it,
    whatever `server.direct_http` says (only `launch.run_app` moves the proxy away)."""
    monkeypatch.delenv("INFEROS_CONFIG", raising=False)
    import importlib

    import deployments.serve_entry as entry

    entry = importlib.reload(entry)
    for app in (entry.app, entry.app_builder({"server": {"direct_http": True}})):
        *_, direct_http = app._bound_deployment.init_args  # the ingress's bind() arguments
        assert direct_http is False
