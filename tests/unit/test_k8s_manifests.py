"""The manifests under k8s/ are well-formed for their kinds, and agree with each other.

No cluster: minimal JSON schemas written from the Kubernetes API reference (Service,
ConfigMap), KubeRay's ray.io/v1 RayService CRD and prometheus-operator's PodMonitor and
ServiceMonitor CRDs, plus cross-checks (selectors match labels, named ports exist).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
MANIFESTS = [
    "rayservice.yaml",
    "service.yaml",
    "monitoring/podmonitor.yaml",
    "monitoring/servicemonitor.yaml",
    "monitoring/grafana-dashboard-configmap.yaml",
]

DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "number", "minimum": 0}]}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
INT_OR_NAME = {"anyOf": [PORT, {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}]}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": DNS1123},
        "namespace": {"type": "string", "pattern": DNS1123},
        "labels": STR_MAP,
        "annotations": STR_MAP,
    },
}


def _object(api_version: str, kind: str, **props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", *props],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": METADATA,
            **props,
        },
    }


SERVICE = _object(
    "v1",
    "Service",
    spec={
        "type": "object",
        "required": ["ports", "selector"],
        "properties": {
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
            "selector": {**STR_MAP, "minProperties": 1},
            "ports": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {
                        "name": {"type": "string", "pattern": DNS1123},
                        "port": PORT,
                        "targetPort": INT_OR_NAME,
                        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                    },
                },
            },
        },
    },
)
CONFIGMAP = _object("v1", "ConfigMap", data={**STR_MAP, "minProperties": 1})

CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": DNS1123},
        "image": {"type": "string", "minLength": 1},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {
                    "name": {"type": "string", "maxLength": 15, "pattern": DNS1123},
                    "containerPort": PORT,
                },
            },
        },
        "resources": {
            "type": "object",
            "properties": {
                "requests": {"type": "object", "additionalProperties": QUANTITY},
                "limits": {"type": "object", "additionalProperties": QUANTITY},
            },
        },
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": STR_MAP}},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}},
        },
    },
}
RAY_START_PARAMS = STR_MAP  # map[string]string in the CRD: numbers must be quoted
WORKER_GROUP = {
    "type": "object",
    "required": [
        "groupName",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "rayStartParams",
        "template",
    ],
    "properties": {
        "groupName": {"type": "string", "pattern": DNS1123},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "rayStartParams": RAY_START_PARAMS,
        "template": POD_TEMPLATE,
    },
}
RAYSERVICE = _object(
    "ray.io/v1",
    "RayService",
    spec={
        "type": "object",
        "required": ["rayClusterConfig"],
        "anyOf": [{"required": ["serveConfigV2"]}, {"required": ["serveConfigs"]}],
        "properties": {
            "serveConfigV2": {"type": "string", "minLength": 1},
            "rayClusterConfig": {
                "type": "object",
                "required": ["headGroupSpec"],
                "properties": {
                    "rayVersion": {"type": "string"},
                    "headGroupSpec": {
                        "type": "object",
                        "required": ["rayStartParams", "template"],
                        "properties": {
                            "rayStartParams": RAY_START_PARAMS,
                            "template": POD_TEMPLATE,
                        },
                    },
                    "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
                },
            },
        },
    },
)

SELECTOR = {
    "type": "object",
    "required": ["matchLabels"],
    "properties": {"matchLabels": {**STR_MAP, "minProperties": 1}},
}
SCRAPE_ENDPOINT = {
    "type": "object",
    "required": ["port", "path"],
    "properties": {
        "port": {"type": "string", "pattern": DNS1123},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
    },
}
ENDPOINTS = {"type": "array", "minItems": 1, "items": SCRAPE_ENDPOINT}
PODMONITOR = _object(
    "monitoring.coreos.com/v1",
    "PodMonitor",
    spec={
        "type": "object",
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {"selector": SELECTOR, "podMetricsEndpoints": ENDPOINTS},
    },
)
SERVICEMONITOR = _object(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    spec={
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {"selector": SELECTOR, "endpoints": ENDPOINTS},
    },
)
SCHEMAS = {
    "Service": SERVICE,
    "ConfigMap": CONFIGMAP,
    "RayService": RAYSERVICE,
    "PodMonitor": PODMONITOR,
    "ServiceMonitor": SERVICEMONITOR,
}


def load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: one object per file"
    return docs[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_schema_of_its_kind(name: str) -> None:
    doc = load(name)
    assert doc.get("kind") in SCHEMAS, f"{name}: unexpected kind {doc.get('kind')}"
    jsonschema.validate(doc, SCHEMAS[doc["kind"]])


def test_schemas_reject_broken_objects() -> None:
    service = load("service.yaml")
    service["spec"]["ports"][0]["port"] = "8000"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, SERVICE)
    ray = load("rayservice.yaml")
    ray["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ray, RAYSERVICE)
    del ray["spec"]["serveConfigV2"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ray, RAYSERVICE)


def _cluster() -> dict[str, Any]:
    return load("rayservice.yaml")["spec"]["rayClusterConfig"]


def _head_container() -> dict[str, Any]:
    return _cluster()["headGroupSpec"]["template"]["spec"]["containers"][0]


def _head_labels() -> dict[str, str]:
    return _cluster()["headGroupSpec"]["template"]["metadata"]["labels"]


def test_serve_config_runs_the_inferos_app() -> None:
    serve = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    assert serve["http_options"]["port"] == 8000
    (app,) = serve["applications"]
    assert app["name"] == "inferos"
    assert app["import_path"] == "deployments.serve_entry:app"
    assert app["route_prefix"] == "/"
    assert {d["name"] for d in app.get("deployments", [])} <= {"ingress", "prefill", "decode"}


def _custom_resources(params: dict[str, str]) -> dict[str, float]:
    # KubeRay passes the value to `ray start --resources=...` verbatim: a quoted JSON object.
    return json.loads(json.loads(params["resources"])) if "resources" in params else {}


def test_worker_groups_offer_the_resources_the_deployments_ask_for() -> None:
    groups = {g["groupName"]: g for g in _cluster()["workerGroupSpecs"]}
    assert set(groups) == {"prefill-gpu", "decode-npu-cpu"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    limits = {
        n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()
    }
    assert int(limits["prefill-gpu"]["nvidia.com/gpu"]) == 1
    assert not any("gpu" in k for k in limits["decode-npu-cpu"]), "decode group is CPU-only"
    offered = {n: _custom_resources(g["rayStartParams"]) for n, g in groups.items()}
    assert offered["prefill-gpu"].get("prefill_gpu", 0) > 0
    serve = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    for dep in serve["applications"][0].get("deployments", []):
        wanted = dep.get("ray_actor_options", {}).get("resources", {})
        if wanted:  # some group must offer every custom resource the deployment asks for
            assert any(all(o.get(k, 0) >= v for k, v in wanted.items()) for o in offered.values())


def test_head_exposes_serve_port_named_like_the_monitors_expect() -> None:
    ports = {p["name"]: p["containerPort"] for p in _head_container()["ports"]}
    assert ports["serve"] == 8000
    pod_monitor = load("monitoring/podmonitor.yaml")["spec"]
    assert _matches(pod_monitor["selector"]["matchLabels"], _head_labels())
    for ep in pod_monitor["podMetricsEndpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"


def test_service_and_servicemonitor_point_at_the_head() -> None:
    service = load("service.yaml")
    assert _matches(service["spec"]["selector"], _head_labels())
    container_ports = {p["name"]: p["containerPort"] for p in _head_container()["ports"]}
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["serve"]["port"] == 8000
    target = by_name["serve"].get("targetPort", 8000)
    assert target in container_ports or target in container_ports.values()
    monitor = load("monitoring/servicemonitor.yaml")["spec"]
    assert _matches(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    for ep in monitor["endpoints"]:
        assert ep["port"] in by_name and ep["path"] == "/metrics"


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    cm = load("monitoring/grafana-dashboard-configmap.yaml")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert json.loads(text)["uid"] == "inferos-serve"
