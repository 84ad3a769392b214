"""The k8s/ manifests against the official Kubernetes JSON schemas (strict: unknown fields
refused), as shipped by the `kubernetes-validate` package, and the RayService's embedded
Serve config against Ray Serve's own `ServeDeploySchema`.

Standard kinds (Service, ConfigMap) are validated whole; for the RayService, whose CRD
schema is not packaged anywhere we can install from, the CRD's required fields are checked
in test_k8s_manifests.py and every pod template it embeds (head and worker groups, which
the CRD declares as core/v1 PodTemplateSpec) is validated here against the official schema.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from referencing import Registry, Resource

K8S = Path(__file__).resolve().parents[2] / "k8s"
K8S_VERSION = "1.30"  # the oldest Kubernetes minor still commonly run; newer ones accept these
SCHEMAS = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def strict_validator(schema_file: str) -> jsonschema.Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    defs = json.loads((SCHEMAS / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


@pytest.mark.parametrize("name", ["service.yaml", "monitoring/grafana-dashboard-configmap.yaml"])
def test_standard_kinds_match_the_official_schemas(name: str) -> None:
    assert kubernetes_validate.validate(load(name), K8S_VERSION, strict=True)


def test_strict_schemas_catch_typos() -> None:
    service = load("service.yaml")
    service["spec"]["selectr"] = service["spec"].pop("selector")
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    template = pod_templates(load("rayservice.yaml"))["head"]
    template["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    with pytest.raises(jsonschema.ValidationError):
        strict_validator("podtemplatespec-v1.json").validate(template)


def test_rayservice_pod_templates_match_podtemplatespec() -> None:
    validator = strict_validator("podtemplatespec-v1.json")
    templates = pod_templates(load("rayservice.yaml"))
    assert set(templates) == {"head", "prefill-gpu", "decode-npu-cpu"}
    for group, template in templates.items():
        errors = [e.message for e in validator.iter_errors(template)]
        assert not errors, (group, errors)
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
        # the control API's token reaches every node an ingress replica may land on
        assert env["INFEROS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_serve_config_matches_ray_serves_schema() -> None:
    text = load("rayservice.yaml")["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert app.import_path == "deployments.serve_entry:app"
    broken = yaml.safe_load(text)
    broken["applications"][0]["deployments"][0]["num_replicas"] = "many"
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate(broken)
