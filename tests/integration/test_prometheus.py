"""A real Prometheus server (Debian's `prometheus`, installed by `make e2e-deps`) scrapes the
running app; its query API must find the TTFT, KV-usage and spec-decode series, and every
metric the Grafana dashboard queries. The same app writes the JSON Lines telemetry file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.direct_http import free_port
from tests.integration.conftest import MODEL, AppManager, LiveApp

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "grafana-dashboard.json"
METRIC = re.compile(r"inferos:[a-zA-Z0-9_:]+")
SCRAPE_S = 1


@pytest.fixture(scope="module")
def telemetry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("telemetry")


@pytest.fixture(scope="module")
def live(apps: AppManager, telemetry_dir: Path) -> LiveApp:
    return apps.get({"server": {"telemetry_dir": str(telemetry_dir)}})


@pytest.fixture(scope="module")
def prometheus(live: LiveApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: `make e2e-deps` installs it")
        pytest.skip("prometheus is not installed (make e2e-deps)")
    work = tmp_path_factory.mktemp("prometheus")
    target = live.url.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {SCRAPE_S}s, scrape_timeout: {SCRAPE_S}s}}\n"
        "scrape_configs:\n"
        "  - job_name: inferos\n"
        "    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "ready")
        # the first scrape lands before the traffic, so rate() and increase() see it all
        _wait(lambda: query(url, 'up{job="inferos"} == 1'), 60, "a first scrape")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def traffic(live: LiveApp, prometheus: str) -> str:
    """A few real requests, streamed and not, and one refused (so the error counter has a
    series too), sent while Prometheus is scraping."""
    client = live.client()
    for i in range(3):
        if i % 2:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Say a word about {i}."}],
                max_tokens=8,
                stream=True,
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            client.completions.create(model=MODEL, prompt=f"Number {i} is", max_tokens=8)
    with live.http() as h:
        assert h.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    return prometheus


def _wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_ttft_kv_usage_and_spec_decode(traffic: str) -> None:
    prometheus = traffic
    # TTFT observations from the requests above, once a scrape has seen them
    _wait(
        lambda: any(
            float(s["value"][1]) >= 3
            for s in query(prometheus, "sum(inferos:time_to_first_token_seconds_count)")
        ),
        60,
        "TTFT observations in Prometheus",
    )
    up = query(prometheus, 'up{job="inferos"}')
    assert up and all(s["value"][1] == "1" for s in up)
    usage = query(prometheus, "inferos:kv_cache_usage_perc")
    assert {s["metric"]["role"] for s in usage} == {"prefill", "decode"}
    assert all(s["metric"]["model"] == MODEL for s in usage)
    for name in (
        "inferos:spec_decode_num_drafts_total",
        "inferos:spec_decode_num_draft_tokens_total",
        "inferos:spec_decode_num_accepted_tokens_total",
    ):
        series = query(prometheus, name)
        assert {s["metric"]["role"] for s in series} >= {"decode"}, name
    # the dashboard's TTFT p95 (rate() needs two scrapes that both saw the observations)
    p95_expr = (
        "histogram_quantile(0.95, sum by (le) "
        "(rate(inferos:time_to_first_token_seconds_bucket[1m])))"
    )
    _wait(lambda: query(prometheus, p95_expr), 30, "a TTFT p95")
    assert float(query(prometheus, p95_expr)[0]["value"][1]) > 0

    # the decode replica exports its counters every second and Prometheus scrapes on its
    # own clock: wait for the last request's tokens to be scraped, then check them
    def generated() -> float:
        result = query(prometheus, "sum(inferos:generation_tokens_total)")
        return float(result[0]["value"][1]) if result else 0.0

    _wait(lambda: generated() >= 3 * 8 - 8, 30, "the generated tokens to be scraped")
    assert generated() >= 3 * 8 - 8  # early stops allowed, not zero
    # labels stay bounded: no request ids anywhere
    assert not query(prometheus, '{__name__=~"inferos:.+", req_id!=""}')


def test_every_dashboard_metric_is_exported_by_the_running_app(live: LiveApp, traffic: str) -> None:
    prometheus = traffic
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert len(used) >= 20, used
    page = live.metrics_text()
    exported = {s.name for fam in text_string_to_metric_families(page) for s in fam.samples}
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries series the running app does not export: {missing}"
    # and Prometheus, having scraped the app, evaluates every panel query and knows every name
    _wait(
        lambda: all(query(prometheus, f'count({{__name__="{n}"}})') for n in used),
        30,
        "every dashboard metric in Prometheus",
    )
    for expr in exprs:
        query(prometheus, expr.replace("$model", ".+"))


def test_telemetry_file_gets_a_line_every_second(
    live: LiveApp, traffic: str, telemetry_dir: Path
) -> None:
    def rows() -> list[dict]:
        files = sorted(telemetry_dir.glob("metrics_*.jsonl"))
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]

    start = len(rows())
    time.sleep(3.5)
    got = rows()
    assert len(got) >= start + 2, "about one line per second"
    last = got[-1]
    assert last["model"] == MODEL
    for key in ("time", "tps", "ttft_p95_s", "kv_bytes_per_level", "utilisation"):
        assert key in last
    assert set(last["kv_bytes_per_level"]) == {"L0", "L1", "L2", "L3"}
    assert any(r["tps"] > 0 for r in got), "the requests above show up as tokens/s"
    assert last["policy"]["version"] >= 0
