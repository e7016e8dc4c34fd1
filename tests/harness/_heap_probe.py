"""A server that reports the cyclic garbage it made (``-m tests.harness._heap_probe PORT SECRET``).

It serves like ``python -m harness serve`` with ``gc.DEBUG_SAVEALL`` set, so that every object
the cyclic collector finds unreachable is kept in ``gc.garbage`` instead of freed. When its
stdin is closed (the test's clients are done) it waits a second, collects everything,
frozen objects included, prints one JSON line ``{"garbage": {type name: count}}`` and
shuts down. (The test process drives it with clients; their own
garbage is in their own process.)
"""

from __future__ import annotations

import collections
import gc
import json
import os
import sys

import trio

from harness import demo_agents, serve
from registry import Config


async def main(port: int, secret: str) -> None:
    # every timer short, so that nothing the traffic made is still held by one at the end
    config = Config(auth_secret=secret, shutdown_grace_s=2.0, max_queued_messages=50,
                    detached_run_timeout_s=0.5, agent_timeout_s=3.0, retention_s=0.5,
                    ping_interval_s=0.2, ping_timeout_s=0.2, close_timeout_s=0.5,
                    handshake_timeout_s=0.5)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: serve(
            config, port=port, agents=demo_agents(), stop=stop, task_status=task_status))
        gc.set_debug(0)  # what start-up left (imports, class building) is not serving's:
        gc.garbage.clear()  # it is freed for good before the probe starts keeping garbage
        gc.unfreeze()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        print(json.dumps({"port": bound}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass
        await stdin.aclose()
        await trio.sleep(2.0)  # retention expiry and late timers run while still serving
        gc.unfreeze()  # the server froze what lived a while: a cycle among that counts too
        gc.collect()
        report(gc.garbage)
        stop.set()


def report(garbage: list[object]) -> None:
    kinds = collections.Counter(
        f"{type(obj).__qualname__} {getattr(obj, '__qualname__', '')}".strip()
        for obj in garbage)
    print(json.dumps({"garbage": dict(kinds)}), flush=True)


if __name__ == "__main__":
    gc.set_debug(gc.DEBUG_SAVEALL)
    trio.run(main, int(sys.argv[1]), sys.argv[2])
