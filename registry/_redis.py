"""The Redis :class:`~registry._shared.SharedState`: every node of a service on one Redis.

Built on coredis (anyio: runs under trio and asyncio). Open it with :func:`open_redis_state`.
Needs a single Redis >= 6.2 (a Sentinel-managed primary only behind a stable address: see
docs/SCALING.md), not a Cluster: the scripts touch
keys of several users in one step. All keys start with ``key_prefix`` (``P``, default
``reg:``). A user or request id is client input, so it enters a key only as ``h(id)``, the
first 32 hex digits of its SHA-256; every other variable part ends its key, after a prefix
naming the key's type, so no run or node id can name another key.

Key layout:

* ``P run:{run_id}`` hash, the run's record: ``user_id request_id thread_id agent node_id``,
  ``ended`` (0/1), ``open_tools`` (JSON object), ``trimmed`` (the seq trimmed through), and
  the keys ``finish``/``drop`` clean up: ``akey`` (the user's active set), ``dkey`` (dedup).
* ``P log:{run_id}`` stream, the run's event log: entry id ``0-{seq}``, one field ``f`` = the
  event's wire bytes. Redis itself refuses an id at or below the stream's top, so an append
  is idempotent; ``trim`` is ``XTRIM MINID 0-{seq+1}`` and moves the stream's last id up to
  the trimmed seq (``XSETID``), so a late append of a trimmed seq is refused too.
* ``P dedup:{h(user)}:{h(request_id)}`` string -> run_id, ``PX dedup_ttl_s``, then
  ``retention_s`` from ``finish``.
* ``P active:all``, ``P active:user:{h(user)}``, ``P noderuns:{node_id}`` sets of active
  run ids.
* ``P conns:{h(user)}`` hash conn_id -> node_id; ``P nodeconns:{node_id}`` set of
  ``{h(user)}:{conn_id}``, to find a dead node's connections.
* ``P nodes`` set of node ids that ever heartbeat; ``P lease:{node_id}`` (``PX lease_s``);
  ``P claim:{node_id}`` = the claiming node (``NX PX claim_ttl_s``).
* ``P mail:{node_id}`` pub/sub channel, the node's mailbox.

Each state change is one Lua script (one round trip, atomic): ``admit`` (dedup check, both
limits, registration), ``finish``, ``drop``, ``set_open_tools`` and ``trim`` (which never
recreate a run that is gone), ``connect``/``disconnect``, ``heartbeat``, ``dead_nodes``,
``claim``, ``forget_node``, ``restore`` (a node writes its runs again into a Redis that lost
them: ``heartbeat`` tells it). The admissions asked for at one moment (a burst of starts) go
together in one ``admit_many`` script, each admitted in turn. A node writes a batch in one
``apply`` script (one command and round trip; by SHA, loaded again on ``NOSCRIPT``) that runs
the steps ``append`` (one ``XADD`` per event of every run, the events packed in one binary
argument; an id already there is skipped; a tail sees the batch whole), then open tools, trims,
ends, disconnects and drops, each the script of that name as a Lua function; ``read`` is ``HGET
trimmed`` + ``XRANGE`` in one ``MULTI``; ``tail`` is ``XREAD BLOCK`` on a second connection
pool (``max_tails`` connections), so that waiting tails never hold the connections the others
multiplex on. Every command is safe to run twice (coredis retries one whose connection broke):
a re-run admit finds its own run, a re-run claim its own claim, a re-run finish changes
nothing. Only ``PUBLISH`` is not, so it goes through a third client that never retries (a
message is delivered at most once).

Every connection error and timeout (``timeout_s`` per call, ``wait_s + timeout_s`` for
``tail``) is raised as :class:`SharedStateUnavailable`; coredis reconnects on the next
command, so the state serves again as soon as Redis is back. An open mailbox outlives an
outage: it resubscribes by itself (the messages sent meanwhile are lost: best effort).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, Final, final

import anyio
import attrs
import coredis
import coredis.exceptions
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from coredis.commands.script import Script
from coredis.response.types import StreamEntry
from coredis.retry import (
    CompositeRetryPolicy,
    ConstantRetryPolicy,
    ExponentialBackoffRetryPolicy,
    NoRetryPolicy,
)

from registry._errors import Overloaded, RateLimited
from registry._shared import Batch, RunRecord, SharedStateUnavailable
from registry._util import Deadline, deadlines, unwrapping_groups

__all__ = ["RedisSharedState", "open_redis_state"]

logger = logging.getLogger(__name__)

#: What a broken or unreachable Redis raises through coredis.
_UNAVAILABLE: Final = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError
    coredis.exceptions.ReadOnlyError,  # a replica after a failover
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)

#: An open mailbox resubscribes by itself after an outage, however long.
_RESUBSCRIBE: Final = CompositeRetryPolicy(
    ExponentialBackoffRetryPolicy(
        (coredis.exceptions.ConnectionError, TimeoutError), retries=None,
        base_delay=0.05, max_delay=1.0, jitter=True,
    ),
)

#: Redis's clock in ms, in a script (every node compares expiries on the same clock; coredis's
#: ``TIME`` reply loses the milliseconds, so scripts read the clock themselves).
_NOW_MS: Final = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

#: The ``append`` step's binary layout: a log's event count, an event's seq and length.
_COUNT: Final = struct.Struct(">I")
_ENTRY: Final = struct.Struct(">II")

# admit codes
_NEW, _DUPLICATE, _RATE_LIMITED, _OVERLOADED = 0, 1, 2, 3

_ADMIT: Final = """
-- KEYS: dedup, active:user, active:all, run, noderuns
-- ARGV: run_id, per_user, max_all, dedup_ms, prefix, user_id, request_id, thread_id, agent,
--       node_id, open_tools
local existing = redis.call('GET', KEYS[1])
if existing then
  local fields = redis.call('HGETALL', ARGV[5] .. 'run:' .. existing)
  if #fields > 0 then return {1, existing, fields} end
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then return {2} end
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return {3} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[4], 'user_id', ARGV[6], 'request_id', ARGV[7], 'thread_id', ARGV[8],
  'agent', ARGV[9], 'node_id', ARGV[10], 'ended', '0', 'open_tools', ARGV[11],
  'trimmed', '0', 'akey', KEYS[2], 'dkey', KEYS[1])
return {0}
"""

_APPEND: Final = """
-- KEYS: the runs' logs; ARGV[1]: per log in turn, its count n (4 bytes, big-endian), then n
-- events, each its seq and its length (4 bytes each) and its bytes, in seq order
local blob, at = ARGV[1], 1
for k = 1, #KEYS do
  local n
  n, at = struct.unpack('>I4', blob, at)
  for _ = 1, n do
    local seq, size
    seq, size, at = struct.unpack('>I4I4', blob, at)
    local data = string.sub(blob, at, at + size - 1)
    local added = redis.pcall('XADD', KEYS[k], '0-' .. seq, 'f', data)
    if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller') then
      return added
    end
    at = at + size
  end
end
return 0
"""

_FINISH: Final = """
-- KEYS: run, log, active:all; ARGV: run_id, retention_ms, prefix
local f = redis.call('HMGET', KEYS[1], 'akey', 'dkey', 'node_id', 'ended')
if not f[1] or f[4] == '1' then return 0 end
redis.call('SREM', f[1], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', ARGV[3] .. 'noderuns:' .. f[3], ARGV[1])
redis.call('HSET', KEYS[1], 'ended', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local owner = redis.call('GET', f[2])
if owner == ARGV[1] then
  redis.call('PEXPIRE', f[2], ARGV[2])
elseif not owner then
  redis.call('SET', f[2], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

_DROP: Final = """
-- KEYS: run, log, active:all; ARGV: run_id, prefix
local f = redis.call('HMGET', KEYS[1], 'akey', 'dkey', 'node_id')
if f[1] then
  redis.call('SREM', f[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('SREM', ARGV[2] .. 'noderuns:' .. f[3], ARGV[1])
  if redis.call('GET', f[2]) == ARGV[1] then redis.call('DEL', f[2]) end
end
redis.call('DEL', KEYS[1], KEYS[2])
return 0
"""

_SET_OPEN_TOOLS: Final = """
-- KEYS: runs; ARGV: each run's open_tools
for k = 1, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('HSET', KEYS[k], 'open_tools', ARGV[k]) end
end
return 0
"""

#: ``live_follows(key, except_node)``: node -> seq of a follow hash's entries not expired.
_LIVE_FOLLOWS: Final = _NOW_MS + """
local function live_follows(key, except_node)
  local live = {}
  local follows = redis.call('HGETALL', key)
  for i = 1, #follows, 2 do
    local seq, untils = string.match(follows[i + 1], '(%d+) (%d+)')
    if follows[i] ~= except_node and tonumber(untils) > now_ms then
      live[follows[i]] = tonumber(seq)
    end
  end
  return live
end
"""

_TRIM: Final = _LIVE_FOLLOWS + """
-- KEYS: run, log[, follow]; ARGV: through[, node_id]
-- With the follow hash: never past what a follower other than node_id still needs.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local through = tonumber(ARGV[1])
if KEYS[3] then
  for _, seq in pairs(live_follows(KEYS[3], ARGV[2])) do
    if seq < through then through = seq end
  end
end
if through <= tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0') then return 0 end
redis.call('HSET', KEYS[1], 'trimmed', through)
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  local top = 0
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then top = tonumber(string.match(info[i + 1], '%d+$')) end
  end
  if top < through then redis.call('XSETID', KEYS[2], '0-' .. through) end
  redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (through + 1))
else
  redis.call('XADD', KEYS[2], '0-' .. through, 'f', '')
  redis.call('XDEL', KEYS[2], '0-' .. through)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return 1
"""

_FOLLOW: Final = _NOW_MS + """
-- KEYS: follow; ARGV: node_id, through, ttl_ms (the hash expires with its last entry)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. string.format('%.0f', now_ms + ttl))
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""

_FOLLOWERS: Final = _LIVE_FOLLOWS + """
-- KEYS: follow; returns node, through, node, through... of the entries not expired
local out = {}
for node, seq in pairs(live_follows(KEYS[1], false)) do
  table.insert(out, node)
  table.insert(out, seq)
end
return out
"""

_CONNECT: Final = """
-- KEYS: conns, nodeconns; ARGV: conn_id, node_id, limit, member
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""

_DISCONNECT: Final = """
-- KEYS: conns; ARGV: conn_id, member, prefix
local node = redis.call('HGET', KEYS[1], ARGV[1])
if not node then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', ARGV[3] .. 'nodeconns:' .. node, ARGV[2])
return 1
"""

_HEARTBEAT: Final = """
-- KEYS: lease, nodes; ARGV: node_id, lease_ms
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return redis.call('SADD', KEYS[2], ARGV[1])
"""

_RESTORE: Final = """
-- KEYS: run, log, dedup, active:user, active:all, noderuns
-- ARGV: run_id, user_id, request_id, thread_id, agent, node_id, ended, open_tools, trimmed,
--       dedup_ms, retention_ms, then seq, data pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
for i = 12, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '0-' .. ARGV[i], 'f', ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'user_id', ARGV[2], 'request_id', ARGV[3], 'thread_id', ARGV[4],
  'agent', ARGV[5], 'node_id', ARGV[6], 'ended', ARGV[7], 'open_tools', ARGV[8],
  'trimmed', ARGV[9], 'akey', KEYS[4], 'dkey', KEYS[3])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[11])
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[11]) end
else
  redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[10])
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('SADD', KEYS[5], ARGV[1])
  redis.call('SADD', KEYS[6], ARGV[1])
end
return 1
"""

_DEAD_NODES: Final = """
-- KEYS: nodes; ARGV: prefix
local dead = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. node) == 0
      and redis.call('EXISTS', ARGV[1] .. 'claim:' .. node) == 0 then
    table.insert(dead, node)
  end
end
return dead
"""

_CLAIM: Final = """
-- KEYS: lease, claim; ARGV: by, claim_ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 1 end
return 0
"""

_FORGET_NODE: Final = """
-- KEYS: nodeconns, noderuns, claim, nodes; ARGV: node_id, prefix
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local colon = string.find(member, ':', 1, true)
  local conns = ARGV[2] .. 'conns:' .. string.sub(member, 1, colon - 1)
  local conn_id = string.sub(member, colon + 1)
  if redis.call('HGET', conns, conn_id) == ARGV[1] then redis.call('HDEL', conns, conn_id) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return 0
"""


def _h(value: str) -> str:
    """A client-chosen id as a fixed-length key part (128 bits of its SHA-256)."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _ms(seconds: float) -> int:
    """A duration for ``PX``/``PEXPIRE``: whole milliseconds, at least 1."""
    return max(1, math.ceil(seconds * 1000))


def _event(entry: StreamEntry) -> tuple[int, bytes]:
    """A stream entry ``0-{seq}`` as (seq, wire bytes)."""
    data = entry.field_values[b"f"]
    return int(_text(entry.identifier).rpartition("-")[2]), (
        data if isinstance(data, bytes) else data.encode()
    )


def _text(value: object) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else str(value)


def _record(run_id: str, fields: Mapping[Any, Any]) -> RunRecord:
    text = {_text(key): _text(value) for key, value in fields.items()}
    return RunRecord(
        run_id=run_id, user_id=text["user_id"], request_id=text["request_id"],
        thread_id=text["thread_id"], agent=text["agent"], node_id=text["node_id"],
        ended=text["ended"] == "1", open_tools=json.loads(text["open_tools"]),
    )


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    """A Lua ``HGETALL`` reply (a flat list) as a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@final
@attrs.define(eq=False)
class _Admission:
    """One ``admit`` waiting for its batch: its keys and args, then its reply or failure."""

    keys: list[str]
    args: list[str | int]
    done: anyio.Event = attrs.field(factory=anyio.Event)
    reply: Any = None
    failure: Exception | None = None


@final
@attrs.define(eq=False)
class _Inbox:
    """A mailbox's messages; raises SharedStateUnavailable if its subscriber failed."""

    _receive: MemoryObjectReceiveStream[bytes]
    _failed: list[BaseException]

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            if self._failed:
                raise SharedStateUnavailable("the mailbox lost its subscription") from (
                    self._failed[0]
                )
            raise StopAsyncIteration from None


@final
@attrs.define(eq=False)
class RedisSharedState:
    """Shared state in Redis (a :class:`SharedState`); see the module docstring.

    Construct it, then use it inside :func:`open_redis_state` (which opens its clients), or
    enter :meth:`open` yourself.

    Attributes:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        key_prefix: Starts every key and channel (several services can share one Redis).
        timeout_s: A call that takes longer raises :class:`SharedStateUnavailable`.
        claim_ttl_s: How long a claim on a dead node lasts.
        max_tails: Connections for concurrent :meth:`tail` calls (each blocks one).
        mailbox_size: Messages a mailbox holds before further ones are dropped.
    """

    url: str
    key_prefix: str = attrs.field(default="reg:", kw_only=True)
    timeout_s: float = attrs.field(default=5.0, kw_only=True)
    claim_ttl_s: float = attrs.field(default=300.0, kw_only=True)
    max_tails: int = attrs.field(default=256, kw_only=True)
    mailbox_size: int = attrs.field(default=1024, kw_only=True)
    _client: coredis.Redis[bytes] = attrs.field(init=False)
    _tails: coredis.Redis[bytes] = attrs.field(init=False)
    _mail: coredis.Redis[bytes] = attrs.field(init=False)
    _scripts: dict[str, Script[bytes]] = attrs.field(init=False, factory=dict)
    _fail_after: Deadline = attrs.field(init=False, default=anyio.fail_after)
    _unavailable: tuple[type[BaseException], ...] = attrs.field(init=False, default=_UNAVAILABLE)
    _admissions: list[_Admission] = attrs.field(init=False, factory=list)
    _admission_queued: anyio.Event | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        retry = ConstantRetryPolicy((coredis.exceptions.ConnectionError,), retries=2, delay=0.01)
        self._client = coredis.Redis.from_url(self.url, retry_policy=retry)
        self._tails = coredis.Redis.from_url(
            self.url, retry_policy=retry, max_connections=self.max_tails
        )
        self._mail = coredis.Redis.from_url(self.url, retry_policy=NoRetryPolicy())
        for name, lua in _SCRIPTS.items():
            self._scripts[name] = self._client.register_script(lua)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[RedisSharedState]:
        """Opens the clients (no connection yet: the first command connects); closes them.

        Enter it in the task that owns the state, before any task uses it.
        """
        self._fail_after, too_slow = deadlines()
        self._unavailable = (*_UNAVAILABLE, *too_slow)
        async with unwrapping_groups(), self._client, self._tails, self._mail, \
                anyio.create_task_group() as services:
            await services.start(self._admitter)
            try:
                yield self
            finally:
                services.cancel_scope.cancel()

    # ------------------------------------------------------------ admission
    async def admit(
        self, record: RunRecord, *, max_active_runs_per_user: int, max_active_runs: int,
        dedup_ttl_s: float,
    ) -> tuple[RunRecord, bool]:
        """See :meth:`SharedState.admit`; a retried admit of the same run_id is not a duplicate.

        Admissions asked for at one moment (runs started together) share one command: see
        :meth:`_admitter`.
        """
        keys = [
            self._key("dedup:", _h(record.user_id), ":", _h(record.request_id)),
            self._key("active:user:", _h(record.user_id)), self._key("active:all"),
            self._key("run:", record.run_id), self._key("noderuns:", record.node_id),
        ]
        args: list[str | int] = [
            record.run_id, max_active_runs_per_user, max_active_runs, _ms(dedup_ttl_s),
            self.key_prefix, record.user_id, record.request_id, record.thread_id, record.agent,
            record.node_id, json.dumps(dict(record.open_tools)),
        ]
        admission = _Admission(keys, args)
        self._admissions.append(admission)
        if self._admission_queued is not None:
            self._admission_queued.set()
        await admission.done.wait()
        if admission.failure is not None:
            if isinstance(admission.failure, SharedStateUnavailable):
                raise SharedStateUnavailable(str(admission.failure)) from admission.failure
            raise RuntimeError(f"admission failed: {admission.failure!r}") from admission.failure
        reply = admission.reply
        code = int(reply[0])
        if code == _DUPLICATE:
            existing = _record(_text(reply[1]), _pairs(reply[2]))
            return existing, existing.run_id != record.run_id
        if code == _RATE_LIMITED:
            raise RateLimited(f"the user already has {max_active_runs_per_user} runs in flight")
        if code == _OVERLOADED:
            raise Overloaded(f"at max_active_runs ({max_active_runs})")
        return record, False

    async def _admitter(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Sends the admissions queued, all of them in one ``admit_many`` script, until
        cancelled. A caller that stops waiting does not take its admission back (it may
        already be in Redis): the registry drops such a run."""
        task_status.started()
        while True:
            if not self._admissions:
                self._admission_queued = anyio.Event()
                await self._admission_queued.wait()
            batch, self._admissions = self._admissions, []
            try:
                replies = await self._run_script(
                    "admit_many", [key for a in batch for key in a.keys],
                    [arg for a in batch for arg in a.args])
            except Exception as exc:  # every admission of the batch gets it
                for admission in batch:
                    admission.failure = exc
            else:
                for admission, reply in zip(batch, replies, strict=True):
                    admission.reply = reply
            for admission in batch:
                admission.done.set()

    async def set_open_tools(self, run_id: str, open_tools: Mapping[str, str]) -> None:
        """See :meth:`SharedState.set_open_tools` (a run that is gone is left alone)."""
        await self._run_script(
            "set_open_tools", [self._key("run:", run_id)], [json.dumps(dict(open_tools))]
        )

    async def finish(self, run_id: str, *, retention_s: float) -> None:
        """See :meth:`SharedState.finish`: a second call changes nothing."""
        await self._run_script(
            "finish", self._run_keys(run_id), [run_id, _ms(retention_s), self.key_prefix]
        )

    async def drop(self, run_id: str) -> None:
        """See :meth:`SharedState.drop`."""
        await self._run_script("drop", self._run_keys(run_id), [run_id, self.key_prefix])

    async def record(self, run_id: str) -> RunRecord | None:
        """See :meth:`SharedState.record`."""
        with self._guard():
            fields = await self._client.hgetall(self._key("run:", run_id))
        return _record(run_id, fields) if fields else None

    # ------------------------------------------------------------ event log
    async def append(self, run_id: str, entries: Sequence[tuple[int, bytes]]) -> None:
        """See :meth:`SharedState.append`: one script of one ``XADD`` per event."""
        await self.append_many({run_id: entries})

    async def append_many(
        self, logs: Mapping[str, Sequence[tuple[int, bytes]]],
        open_tools: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """See :meth:`SharedState.append_many` (an :meth:`apply`)."""
        await self.apply(Batch(logs=logs, open_tools=open_tools or {}))

    async def apply(self, batch: Batch) -> None:
        """See :meth:`SharedState.apply`: one ``apply`` script, one command and one round
        trip: every run's events (the ``append`` step), then the other steps (a tail sees
        each run's events whole). Every step is idempotent, so a batch that failed half-way
        is applied again whole."""
        if batch.empty:
            return
        keys: list[str] = []
        calls: list[int] = []
        args: list[str | int | bytes] = []

        def call(step: str, step_keys: list[str], step_args: list[str | int | bytes]) -> None:
            calls.extend((_BATCH_STEPS.index(step) + 1, len(step_keys), len(step_args)))
            keys.extend(step_keys)
            args.extend(step_args)

        logs = {run_id: entries for run_id, entries in batch.logs.items() if entries}
        if logs:
            blob: list[bytes] = []
            for entries in logs.values():
                blob.append(_COUNT.pack(len(entries)))
                for seq, data in entries:
                    blob += (_ENTRY.pack(seq, len(data)), data)
            call("append", [self._key("log:", r) for r in logs], [b"".join(blob)])
        if batch.open_tools:
            call("set_open_tools", [self._key("run:", run_id) for run_id in batch.open_tools],
                 [json.dumps(dict(tools)) for tools in batch.open_tools.values()])
        for run_id, (seq, node_id) in batch.acked.items():
            call("trim", [*self._run_keys(run_id)[:2], self._key("follow:", run_id)],
                 [seq, node_id])
        for run_id, retention_s in batch.finished.items():
            call("finish", self._run_keys(run_id), [run_id, _ms(retention_s), self.key_prefix])
        for user_id, conn_id in batch.disconnected:
            call("disconnect", [self._key("conns:", _h(user_id))],
                 [conn_id, f"{_h(user_id)}:{conn_id}", self.key_prefix])
        for run_id in batch.dropped:
            call("drop", self._run_keys(run_id), [run_id, self.key_prefix])
        await self._run_script("apply", [], [len(calls) // 3, len(keys), *calls, *keys, *args])

    async def read(self, run_id: str, after_seq: int) -> tuple[int, list[tuple[int, bytes]]]:
        """See :meth:`SharedState.read`: one ``MULTI`` of ``HGET`` and ``XRANGE``."""
        with self._guard():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hget(self._key("run:", run_id), "trimmed")
                pipe.xrange(self._key("log:", run_id), f"0-{after_seq + 1}", "+")
        trimmed, entries = pipe.results or (None, ())
        return int(trimmed or 0), [_event(entry) for entry in entries]

    async def tail(
        self, run_id: str, after_seq: int, wait_s: float
    ) -> list[tuple[int, bytes]]:
        """See :meth:`SharedState.tail`: ``XREAD BLOCK`` on its own connection. Cancel-safe."""
        log = self._key("log:", run_id)
        block = None if wait_s <= 0 else _ms(wait_s)
        with self._guard(self.timeout_s + max(wait_s, 0)):
            reply = await self._tails.xread({log: f"0-{after_seq}"}, block=block)
        if not reply:
            return []
        return [_event(entry) for entries in reply.values() for entry in entries]

    async def trim(self, run_id: str, through_seq: int) -> None:
        """See :meth:`SharedState.trim`: a later append at or below ``through_seq`` is skipped."""
        await self._run_script("trim", self._run_keys(run_id)[:2], [through_seq])

    # ---------------------------------------------------------- connections
    async def connect(self, user_id: str, conn_id: str, node_id: str, limit: int) -> bool:
        """See :meth:`SharedState.connect`: a conn_id already counted is True again."""
        keys = [self._key("conns:", _h(user_id)), self._key("nodeconns:", node_id)]
        member = f"{_h(user_id)}:{conn_id}"
        return bool(await self._run_script("connect", keys, [conn_id, node_id, limit, member]))

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        """See :meth:`SharedState.disconnect`."""
        member = f"{_h(user_id)}:{conn_id}"
        await self._run_script(
            "disconnect", [self._key("conns:", _h(user_id))], [conn_id, member, self.key_prefix]
        )

    # ---------------------------------------------------------------- nodes
    async def follow(self, run_id: str, node_id: str, ttl_s: float, through: int) -> None:
        """See :meth:`SharedState.follow`: ``HSET P follow:{run_id} node "through until_ms"``
        on Redis's clock (the hash expires with the entry that expires last)."""
        await self._run_script(
            "follow", [self._key("follow:", run_id)], [node_id, through, _ms(ttl_s)]
        )

    async def followers(self, run_id: str) -> dict[str, int]:
        """See :meth:`SharedState.followers`."""
        flat = await self._run_script("followers", [self._key("follow:", run_id)], [])
        return {_text(node): int(through) for node, through in _pairs(flat).items()}

    async def heartbeat(self, node_id: str, lease_s: float) -> bool:
        """See :meth:`SharedState.heartbeat`."""
        keys = [self._key("lease:", node_id), self._key("nodes")]
        return not int(await self._run_script("heartbeat", keys, [node_id, _ms(lease_s)]))

    async def restore(
        self, record: RunRecord, entries: Sequence[tuple[int, bytes]], *, trimmed: int,
        dedup_ttl_s: float, retention_s: float,
    ) -> bool:
        """See :meth:`SharedState.restore`: one script (the log is written whole or not)."""
        keys = [
            self._key("run:", record.run_id), self._key("log:", record.run_id),
            self._key("dedup:", _h(record.user_id), ":", _h(record.request_id)),
            self._key("active:user:", _h(record.user_id)), self._key("active:all"),
            self._key("noderuns:", record.node_id),
        ]
        args: list[str | int | bytes] = [
            record.run_id, record.user_id, record.request_id, record.thread_id, record.agent,
            record.node_id, int(record.ended), json.dumps(dict(record.open_tools)), trimmed,
            _ms(dedup_ttl_s), _ms(retention_s),
        ]
        for seq, data in entries:
            args += [seq, data]
        return bool(await self._run_script("restore", keys, args))

    async def dead_nodes(self) -> list[str]:
        """See :meth:`SharedState.dead_nodes` (sorted)."""
        reply = await self._run_script("dead_nodes", [self._key("nodes")], [self.key_prefix])
        return sorted(_text(node) for node in reply)

    async def claim(self, node_id: str, by: str) -> bool:
        """See :meth:`SharedState.claim`: False while the node's lease runs; True again for
        the node that holds the claim."""
        keys = [self._key("lease:", node_id), self._key("claim:", node_id)]
        return bool(await self._run_script("claim", keys, [by, _ms(self.claim_ttl_s)]))

    async def node_runs(self, node_id: str) -> list[str]:
        """See :meth:`SharedState.node_runs` (sorted)."""
        with self._guard():
            members = await self._client.smembers(self._key("noderuns:", node_id))
        return sorted(_text(member) for member in members)

    async def forget_node(self, node_id: str) -> None:
        """See :meth:`SharedState.forget_node`; its claim goes too (it may die again later)."""
        keys = [
            self._key("nodeconns:", node_id), self._key("noderuns:", node_id),
            self._key("claim:", node_id), self._key("nodes"),
        ]
        await self._run_script("forget_node", keys, [node_id, self.key_prefix])

    # ------------------------------------------------------------- mailbox
    async def send(self, node_id: str, message: bytes) -> None:
        """See :meth:`SharedState.send`: ``PUBLISH`` (reaches the mailboxes open now)."""
        with self._guard():
            await self._mail.publish(self._key("mail:", node_id), message)

    def mailbox(self, node_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """See :meth:`SharedState.mailbox`: a subscription to the node's channel.

        Opening raises :class:`SharedStateUnavailable` if Redis does not answer within
        ``timeout_s``; once open, it resubscribes by itself after an outage.
        """
        return self._open_mailbox(self._key("mail:", node_id))

    @asynccontextmanager
    async def _open_mailbox(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await self.ping()  # fails fast: the subscriber would wait for Redis to come back
        send, receive = anyio.create_memory_object_stream[bytes](self.mailbox_size)
        failed: list[BaseException] = []
        async with unwrapping_groups(), anyio.create_task_group() as tg, receive:
            with self._guard():
                await tg.start(self._subscribe, channel, send, failed)
            try:
                yield _Inbox(receive, failed)
            finally:
                tg.cancel_scope.cancel()

    async def _subscribe(
        self, channel: str, send: MemoryObjectSendStream[bytes], failed: list[BaseException],
        *, task_status: TaskStatus[None],
    ) -> None:
        pubsub = self._mail.pubsub(
            channels=[channel], ignore_subscribe_messages=True, retry_policy=_RESUBSCRIBE
        )
        started = False
        try:
            async with send, pubsub:
                task_status.started()
                started = True
                while True:
                    message = await pubsub.get_message()
                    if message is not None and message["type"] == "message":
                        self._deliver(send, message["data"])
        except* _UNAVAILABLE as group:
            if not started:
                raise
            failed.append(group)  # ends the inbox with SharedStateUnavailable

    @staticmethod
    def _deliver(send: MemoryObjectSendStream[bytes], data: object) -> None:
        try:
            send.send_nowait(data if isinstance(data, bytes) else str(data).encode())
        except anyio.WouldBlock:
            logger.warning("a mailbox is full: a message was dropped")

    async def ping(self) -> None:
        """See :meth:`SharedState.ping`."""
        with self._guard():
            await self._client.ping()

    # ------------------------------------------------------------- internals
    def _key(self, *parts: str) -> str:
        return self.key_prefix + "".join(parts)

    def _run_keys(self, run_id: str) -> list[str]:
        return [self._key("run:", run_id), self._key("log:", run_id), self._key("active:all")]

    async def _run_script(
        self, name: str, keys: list[str], args: Sequence[str | int | bytes]
    ) -> Any:
        with self._guard():
            return await self._scripts[name](keys=keys, args=list(args))

    @contextmanager
    def _guard(self, timeout_s: float | None = None) -> Iterator[None]:
        """Raises every connection error or timeout inside as SharedStateUnavailable."""
        try:
            with self._fail_after(self.timeout_s if timeout_s is None else timeout_s):
                yield
        except self._unavailable as exc:
            raise SharedStateUnavailable(f"redis: {exc!r}") from exc
        except BaseExceptionGroup as group:  # from the mailbox's subscriber task
            unavailable, rest = group.split(self._unavailable)
            if unavailable is None or rest is not None:
                raise
            raise SharedStateUnavailable(f"redis: {group!r}") from group


def _lua_function(name: str, script: str) -> str:
    """``script`` as a local Lua function ``name(KEYS, ARGV)``, for a script that runs it
    several times on its own slices of the arguments."""
    return f"local function {name}(KEYS, ARGV)\n{script}\nend\n"


#: Every admission queued at one moment in one script (one command, one round trip): the
#: ``admit`` script per admission in turn (a second start of one request sees the first).
_ADMIT_MANY: Final = _lua_function("admit", _ADMIT) + """
-- KEYS: 5 per admission; ARGV: 11 per admission, in the same order. Replies in that order.
local replies = {}
for i = 0, #KEYS / 5 - 1 do
  local keys, args = {}, {}
  for j = 1, 5 do keys[j] = KEYS[5 * i + j] end
  for j = 1, 11 do args[j] = ARGV[11 * i + j] end
  replies[i + 1] = admit(keys, args)
end
return replies
"""

#: The scripts a batch is made of, in the order :meth:`RedisSharedState.apply` runs them.
_BATCH_STEPS: Final = ("append", "set_open_tools", "trim", "finish", "disconnect", "drop")

#: One batch in one script (atomic like a ``MULTI``, one command instead of one per run):
#: each step above is a function of its own KEYS and ARGV, and the batch is a list of calls.
_APPLY: Final = "".join(
    _lua_function(name, body)
    for name, body in zip(_BATCH_STEPS, (_APPEND, _SET_OPEN_TOOLS, _TRIM, _FINISH, _DISCONNECT,
                                         _DROP), strict=True)
) + f"""
local steps = {{{", ".join(_BATCH_STEPS)}}}
""" + """
-- ARGV: the number of calls c, the number of keys of all calls, then per call (step, its key
-- count, its arg count), then every call's keys in turn, then every call's args in turn (the
-- keys travel as arguments: a client wraps each declared key, which costs more than the
-- script). Stops at a step's error.
local calls = tonumber(ARGV[1])
local k = 3 + 3 * calls
local a = k + tonumber(ARGV[2])
for i = 0, calls - 1 do
  local nk, na = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = ARGV[k + j - 1] end
  for j = 1, na do args[j] = ARGV[a + j - 1] end
  k, a = k + nk, a + na
  local result = steps[tonumber(ARGV[3 + 3 * i])](keys, args)
  if type(result) == 'table' and result.err then return result end
end
return 0
"""

_SCRIPTS: Final = {
    "finish": _FINISH, "drop": _DROP,
    "set_open_tools": _SET_OPEN_TOOLS,
    "trim": _TRIM, "follow": _FOLLOW, "followers": _FOLLOWERS,
    "connect": _CONNECT, "disconnect": _DISCONNECT, "heartbeat": _HEARTBEAT,
    "dead_nodes": _DEAD_NODES, "claim": _CLAIM, "forget_node": _FORGET_NODE,
    "restore": _RESTORE, "apply": _APPLY, "admit_many": _ADMIT_MANY,
}


@asynccontextmanager
async def open_redis_state(
    url: str, *, key_prefix: str = "reg:", timeout_s: float = 5.0
) -> AsyncIterator[RedisSharedState]:
    """Opens a :class:`RedisSharedState` on ``url``; closes its connections on exit.

    Does not connect yet (the first call does, and raises SharedStateUnavailable if Redis is
    unreachable), so a node can start while Redis is down.
    """
    async with RedisSharedState(url, key_prefix=key_prefix, timeout_s=timeout_s).open() as state:
        yield state
