"""`inferos chat`: an interactive terminal chat against a running server.

Streams each answer as it is generated and keeps the conversation's history (every turn
sends the whole history, so the server reuses the earlier turns' KV: one session id per
chat). Lines starting with `/` are commands; Ctrl-C stops the answer being written (what
was written stays in the history), Ctrl-C or Ctrl-D at the prompt ends the chat.

    /profile NAME   the KV profile, through the control API (admin token)
    /spec on|off    speculative decoding on or off (admin token)
    /policy         the current run-time policy
    /reset          forget the history
    /help           this list
    /quit           end the chat
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable
from typing import TextIO

import httpx
from openai import APIError, OpenAI

from serving.env import admin_token, api_key

COMMANDS = __doc__.split("\n\n")[2]
PROMPT = "you> "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None, help="API key (default: $INFEROS_API_KEY)")
    p.add_argument(
        "--admin-token", default=None, help="for /profile and /spec (default: $INFEROS_ADMIN_TOKEN)"
    )
    p.add_argument("--system", default=None, help="a system message opening the chat")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)


class Chat:
    """One conversation with the server; `reply` streams an answer to `out`."""

    def __init__(self, args: argparse.Namespace, out: TextIO = sys.stdout):
        self.url = args.url.rstrip("/")
        key = args.api_key or api_key() or "none"
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)
        self.admin_token = args.admin_token or admin_token()
        self.model = args.model or self.client.models.list().data[0].id
        self.system = args.system
        self.max_tokens, self.temperature = args.max_tokens, args.temperature
        self.out = out
        self.session = f"chat-{uuid.uuid4().hex[:12]}"
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> str:
        """Stream the answer to `text`; Ctrl-C stops it and keeps what was written."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=self.history,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            stream=True,
            extra_headers={"X-Session-Id": self.session},
        )
        try:
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    parts.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:  # closing the stream aborts the request on the server
            self.out.write(" [stopped]")
        finally:
            stream.close()
            self.out.write("\n")
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def command(self, line: str) -> bool:
        """Run a `/command`; False when the chat should end."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.reset()
            self.say("history cleared")
        elif name == "profile" and arg:
            self._set_policy({"kv_profile": arg})
        elif name == "spec" and arg in ("on", "off"):
            self._set_policy({"speculation": arg == "on"})
        elif name == "policy":
            self.say(str(httpx.get(f"{self.url}/v1/policy", timeout=10).json()))
        else:
            self.say(COMMANDS)
        return True

    def _set_policy(self, change: dict) -> None:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        r = httpx.post(f"{self.url}/v1/policy", json=change, headers=headers, timeout=30)
        if r.status_code == 200:
            self.say(f"policy: {r.json()}")
        else:  # the server's own message: bad profile name, missing or wrong token
            message = r.json().get("error", {}).get("message", r.text)
            self.say(f"refused ({r.status_code}): {message}")

    def say(self, text: str) -> None:
        self.out.write(f"[{text}]\n")
        self.out.flush()


def run(args: argparse.Namespace, read: Callable[[str], str] = input) -> int:
    try:
        chat = Chat(args)
    except (APIError, httpx.HTTPError) as e:
        print(f"cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    chat.out.write(f"[chat with {chat.model} at {chat.url}; /help for commands]\n")
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            chat.out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.reply(line)
        except APIError as e:  # e.g. 429 while the server is at its limit: say it, go on
            chat.history.pop()
            chat.say(f"error: {e}")
