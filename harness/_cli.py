"""``python -m harness``: serve, token, chat and demo."""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from harness._auth import mint_token
from harness._demo import demo_main
from harness._server import serve
from harness.agents import demo_agents
from harness.client import chat_main
from harness.fastapi_app import run_server
from registry import Config, ConfigError

__all__ = ["main"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also read from REGISTRY_<NAME>)")
    for setting in Config.settings():
        group.add_argument(setting.flag, dest=f"setting_{setting.name}", metavar="VALUE",
                           help=f"{setting.env_var}; {setting.help}")


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        name.removeprefix("setting_"): value
        for name, value in vars(args).items()
        if name.startswith("setting_") and value is not None
    }
    return Config.from_env(overrides=overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    srv = commands.add_parser("serve", help="run the WebSocket server")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    srv.add_argument("--dev", action="store_true",
                     help="without an auth secret, use a random one (printed on stderr)")
    srv.add_argument("--log-level", default="WARNING")
    srv.add_argument("--server", choices=("trio", "fastapi"), default="trio",
                     help="trio (default), or fastapi: the same protocol on asyncio under uvicorn")
    _add_settings(srv)
    tok = commands.add_parser("token", help="print a token for USER_ID")
    tok.add_argument("user_id")
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    _add_settings(tok)
    chat = commands.add_parser("chat", help="run one chat and print its events live")
    chat.add_argument("message")
    chat.add_argument("--user", default="alice")
    chat.add_argument("--agent", default="research")
    chat.add_argument("--url", default="ws://127.0.0.1:8765/ws")
    chat.add_argument("--context", default=None, help="JSON object for the run's context")
    _add_settings(chat)
    commands.add_parser("demo", help="start a server, run a few chats against it, stop it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "chat":
            return chat_main(args, _config(args))
        return int(demo_main())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _config(args)
    if not config.auth_secret:
        if not args.dev:
            print("error: REGISTRY_AUTH_SECRET (or --auth-secret) is required; "
                  "--dev uses a random one", file=sys.stderr)
            return 2
        secret = secrets.token_urlsafe(32)
        print(f"dev auth secret: {secret}", file=sys.stderr, flush=True)
        config = attrs.evolve(config, auth_secret=secret)
    if args.server == "fastapi":
        return _serve_fastapi(config, args.host, args.port, args.log_level)
    trio.run(_serve_until_signalled, config, args.host, args.port)
    return 0


def _announce(host: str, port: int) -> None:
    """The first stdout line, once the server accepts connections."""
    shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
    print(f"listening on ws://{shown}:{port}/ws", flush=True)


def _serve_fastapi(config: Config, host: str, port: int, log_level: str) -> int:
    """Serves on asyncio under uvicorn until SIGINT or SIGTERM; a second signal changes nothing.

    The signals are ignored until the server takes them, and again once it is done with
    them, so a late one cannot kill the process in the middle of its graceful exit.
    """
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    run_server(config, host=host, port=port, agents=demo_agents(), log_level=log_level,
               on_listening=lambda bound: _announce(host, bound))
    return 0


async def _serve_until_signalled(config: Config, host: str, port: int) -> None:
    """Serves until SIGINT or SIGTERM, then shuts down; a second signal changes nothing.

    The signals are ignored before trio's receiver opens, so a signal still pending when it
    closes is re-delivered to "ignore" instead of the default handler (which would kill
    the process with a non-zero status in the middle of its graceful exit).
    """
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    stop = trio.Event()
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, stop)
            bound = await nursery.start(_serve_task, config, host, port, stop,
                                        nursery.cancel_scope)
            _announce(host, bound)


async def _watch_signals(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if stop.is_set():
            logging.getLogger("harness").info("%s again: already shutting down", name)
        else:
            logging.getLogger("harness").info("%s: shutting down", name)
            stop.set()
async def _serve_task(
    config: Config, host: str, port: int, stop: trio.Event, done: trio.CancelScope,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the server; once it has shut down, ends the signal watcher too."""
    await serve(config, host=host, port=port, agents=demo_agents(), stop=stop,
                task_status=task_status)
    done.cancel()


def _token(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.auth_secret:
        print("error: set REGISTRY_AUTH_SECRET (or --auth-secret)", file=sys.stderr)
        return 2
    print(mint_token(config.auth_secret, args.user_id, args.ttl))
    return 0
