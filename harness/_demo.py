"""``python -m harness demo``: start a server, run a few reference-client chats, stop it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import trio

from harness._auth import mint_token
from harness.client import format_event, open_chat

__all__ = ["demo_main"]

_CHATS: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("echo", "Hello, registry!", None),
    ("scripted", "two tools, five tokens", {"tools": 2, "tokens": 5, "delay_ms": 20}),
    ("research", "How do trio nurseries keep a chat backend honest?", None),
)


def demo_main() -> int:
    """Runs the demo; returns 0 when every chat succeeded and the server stopped cleanly."""
    secret = secrets.token_urlsafe(32)
    env = {**os.environ, "REGISTRY_AUTH_SECRET": secret}
    server = subprocess.Popen(
        [sys.executable, "-m", "harness", "serve", "--port", "0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        print(f"server: {line}")
        url = line.removeprefix("listening on ")
        ok = trio.run(_chats, url, mint_token(secret, "demo-user"))
    finally:
        server.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = server.wait(timeout=30)
        print(f"server stopped with exit code {code} in {time.monotonic() - started:.2f} s")
    return 0 if ok and code == 0 else 1


async def _chats(url: str, token: str) -> bool:
    ok = True
    async with open_chat(url, token) as chat:
        for agent, message, context in _CHATS:
            print(f"\n--- {agent}: {message!r}")
            async for event in chat.run(agent, message, context=context):
                print(format_event(event))
                if event["type"] == "agent_completed":
                    ok = ok and event["payload"]["status"] == "succeeded"
    return ok
