"""Module-level Serve application for `serve run` and KubeRay's `import_path`.

`deployments.serve_entry:app` reads the YAML named by `INFEROS_CONFIG` (defaults otherwise);
`deployments.serve_entry:app_builder` takes the same fields as Serve application args, so a
RayService's `serveConfigV2.applications[].args` can carry the whole config inline.
"""

from __future__ import annotations

from ray.serve import Application

from deployments.app import build_app
from serving.config import InferosConfig
from serving.env import config_path


def app_builder(args: dict) -> Application:
    return build_app(InferosConfig.model_validate(args or {}))


_path = config_path()
app: Application = build_app(InferosConfig.from_yaml(_path) if _path else InferosConfig())
