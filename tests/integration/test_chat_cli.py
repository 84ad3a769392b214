"""`inferos chat` against the real app, as a user types into it: answers stream, the
history goes with each turn, /profile changes the server's policy through the control API,
Ctrl-C stops an answer and the chat goes on, /quit ends it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.integration.conftest import ADMIN_TOKEN
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration


def _sigint_as_in_a_terminal() -> None:
    """Ctrl-C reaches the chat as in a terminal's foreground job. A CI job started with `&`
    by a non-interactive shell has SIGINT ignored; whenever this test process's SIGINT is
    back at that (a handler put back after Ray's), the chat inherits "ignored", Python then
    installs no KeyboardInterrupt handler, and the test's SIGINT did nothing: the story ran
    to its end (how this test failed in background CI runs only; reproduced by ignoring
    SIGINT here before starting the chat)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`inferos chat` in a subprocess; collects its output in the background."""

    def __init__(self, url: str):
        env = os.environ | {"INFEROS_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "chat", "--url", url, "--temperature", "0",
             "--max-tokens", "400"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, preexec_fn=_sigint_as_in_a_terminal,
        )  # fmt: skip
        self.output = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while char := self.proc.stdout.read(1):
            self.output += char

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            assert self.proc.poll() is None, f"chat exited: {self.output}"
            assert time.monotonic() < deadline, f"timed out; output so far: {self.output!r}"
            time.sleep(0.05)

    def prompts(self) -> int:
        return self.output.count("you> ")


def test_chat_streams_keeps_history_changes_policy_and_stops_on_ctrl_c(app) -> None:
    term = Terminal(app.url)
    try:
        term.wait_for(lambda out: "you> " in out)
        prompt_tokens = [total(app.metrics_text(), "inferos:prompt_tokens_total")]
        term.type("My name is Ada. Say hello to me in one short sentence.")
        term.wait_for(lambda _: term.prompts() >= 2)
        assert term.output.split("you> ")[1].strip(), term.output  # the streamed answer
        prompt_tokens.append(total(app.metrics_text(), "inferos:prompt_tokens_total"))

        # the history goes with the next turn: its prompt holds the first turn and answer
        term.type("What is my name?")
        term.wait_for(lambda _: term.prompts() >= 3)
        prompt_tokens.append(total(app.metrics_text(), "inferos:prompt_tokens_total"))
        first_turn, second_turn = (b - a for a, b in itertools.pairwise(prompt_tokens))
        assert second_turn > first_turn + 5, prompt_tokens

        term.type("/profile aggressive")
        term.wait_for(lambda out: "policy:" in out or "refused" in out)
        with httpx.Client(base_url=app.url, timeout=30) as http:
            assert http.get("/v1/policy").json()["kv_profile"] == "aggressive"
        term.type("/profile no-such-profile")
        term.wait_for(lambda out: "refused (4" in out)
        prompts = term.prompts()
        term.type("/profile baseline")  # the shared app's policy back as it was
        # the whole policy line and the next prompt: otherwise the rest of that line, still
        # arriving, passes for the story's first 40 characters and Ctrl-C lands at the prompt
        term.wait_for(lambda out: out.count("policy:") >= 2 and term.prompts() > prompts)

        # Ctrl-C while an answer is written stops it; the chat goes on
        before = len(term.output)
        term.type("Write a very long story about a lighthouse keeper.")
        term.wait_for(lambda out: len(out) > before + 40)
        term.proc.send_signal(signal.SIGINT)
        term.wait_for(lambda out: "[stopped]" in out)
        term.type("/quit")
        assert term.proc.wait(30) == 0, term.output
        with httpx.Client(base_url=app.url, timeout=30) as http:
            assert http.get("/v1/policy").json()["kv_profile"] == "baseline"
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
