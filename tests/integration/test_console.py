"""The web console in real headless Chromium (Debian's, driven by Playwright) against the
live app: a chat answer streams in, the charts update, a profile switch goes through the
control API. Saves a screenshot (INFEROS_CONSOLE_SCREENSHOT=path to keep it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from tests.integration.conftest import ADMIN_TOKEN, MODEL, LiveApp

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator:
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `make e2e-deps` installs it")
        pytest.skip("chromium is not installed (make e2e-deps)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def live(app: LiveApp) -> Iterator[LiveApp]:
    yield app
    with app.http() as h:  # other modules expect the default profile
        r = h.post(
            "/v1/policy",
            json={"kv_profile": app.config.kv_cache.profile},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert r.status_code == 200


def test_console_chat_streams_charts_update_and_profile_switches(
    live: LiveApp, browser, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live.url + "/")
    page.wait_for_function(f"document.getElementById('model').textContent === '{MODEL}'")

    # chat: the answer arrives in several streamed chunks
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Name three colours.")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-done='true']", timeout=120_000)
    assert int(answer.get_attribute("data-chunks")) >= 2, "streamed, not one block"
    text = answer.inner_text()
    assert "TTFT" in text and len(text.split("TTFT")[0].strip()) > 0

    # charts: polled every second; tokens/s shows the chat's tokens
    page.wait_for_function(
        "Number(document.getElementById('chart-tps').dataset.points) >= 3 &&"
        " JSON.parse(document.getElementById('chart-tps').dataset.last)[0] > 0",
        timeout=30_000,
    )
    kv_last = page.eval_on_selector("#chart-kv", "c => JSON.parse(c.dataset.last)")
    assert len(kv_last) == 4  # L0..L3
    assert page.locator("#replicas tbody tr").count() >= 2  # prefill and decode

    # a wrong token is refused and says so; the right one switches the profile
    page.select_option("#kv-profile", "balanced")
    page.fill("#admin-token", "not-the-token")
    page.click("#apply")
    page.wait_for_selector("#policy-status.bad")
    assert "wrong admin token" in page.inner_text("#policy-status")
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#apply")
    page.wait_for_selector("#policy-status.ok")
    page.wait_for_selector("#current-policy[data-profile='balanced']")
    assert ray.get(live.scheduler().get_policy.remote()).kv_profile == "balanced"
    # the charts mark the switch, so what follows reads as B against A
    page.wait_for_function("Number(document.getElementById('chart-tps').dataset.markers) >= 1")
    # and the next answer runs under the new profile
    page.fill("#prompt", "And three animals?")
    page.click("#send")
    page.wait_for_function(
        "document.querySelectorAll(\".msg.assistant[data-done='true']\").length === 2",
        timeout=120_000,
    )
    assert "error" not in page.locator(".msg.assistant").last.get_attribute("class")
    page.wait_for_timeout(2_000)  # two more polls onto the charts

    shot = Path(os.environ.get("INFEROS_CONSOLE_SCREENSHOT", tmp_path / "console.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors
