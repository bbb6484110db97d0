"""Per-token limits, exact across workers and VMs: the counts live in Redis (LIMITS_REDIS_URL).

Three limits per token: ``max_concurrency`` (requests in flight, streams included, until the last
byte or the client leaves), ``rpm`` (requests admitted per rolling 60 s) and ``tpm`` (tokens used
per rolling 60 s). Per token, three keys:

- ``llmproxy:{<id>}:conc``: a sorted set of lease ids scored by their expiry (Redis time, ms).
  A lease is renewed by its worker while the request runs and removed when it ends; a worker
  killed with kill -9 stops renewing, and its leases stop counting one lease period later.
- ``llmproxy:{<id>}:rpm``: a sorted set of admission ids scored by their admission time (ms).
- ``llmproxy:{<id>}:tpm``: a hash of Redis-clock second -> tokens used by the requests that ended
  in that second (at most 60 live fields, so admission reads a bounded set however busy the token).
  A request is counted when it ends (usage total, or the estimate; sent in the background like the
  releases), so admission sees only finished requests: what is in flight can overrun the limit,
  as with OpenAI's own TPM.

``<id>`` is the token's id (``token_id``) or a short hash of the token, never the token itself;
the braces make the keys of a token one Redis Cluster hash slot. Every write sets PEXPIRE, so an
idle token leaves nothing behind.

One request = one round trip: a Lua script (EVALSHA) that reads the Redis clock (so several VMs
agree on the minute), checks the window and the slots, and takes both or nothing. Releases and
renewals never wait on the request path: one background greenlet per worker sends the pending
releases in one pipeline per loop turn, and renews the worker's leases in one pipeline every
lease/3 seconds. The same greenlet does both, so a release always reaches Redis after any renewal
of the same lease (a renewal can never bring a released lease back).

Redis down: requests are admitted without limits (the limiter must never fail a request), with
one error line per outage and a counter; the background greenlet probes Redis at most once a
second and enforcing resumes with one info line when it answers again.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os
import re
import time
import weakref
from dataclasses import dataclass

import gevent
import redis
from gevent.event import Event
from gevent.lock import BoundedSemaphore
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.envparse import without_password

log = logging.getLogger("proxy.limits")

KEY_PREFIX = "llmproxy:"
WINDOW_MS = 60_000
SOCKET_TIMEOUT = 0.5  # connect and read: a dead Redis costs a request at most this, once
PROBE_INTERVAL = 1.0  # seconds between probes while Redis is down
POOL_SIZE = 64  # request-path connections per worker; a greenlet waits for a free one

CONCURRENCY = "concurrency"
RPM = "rpm"
TPM = "tpm"
CODES = {CONCURRENCY: "token_concurrency_limit", RPM: "token_rate_limit", TPM: "token_tpm_limit"}
MESSAGES = {
    CONCURRENCY: "Too many concurrent requests for this API token; retry when one has finished.",
    RPM: "Too many requests per minute for this API token; retry after the time in Retry-After.",
    TPM: "Too many tokens per minute for this API token; retry after the time in Retry-After.",
}

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}").fullmatch

# KEYS: conc, rpm, tpm. ARGV: max_concurrency, rpm, tpm, member, lease_ms.
# Returns {admitted, refused_by (0 none, 1 concurrency, 2 rpm, 3 tpm), retry_ms, in_window,
# in_flight, tokens_in_window}. The tpm hash is only read (and its stale seconds dropped) here:
# tokens are added by COUNT_LUA when a request ends.
ACQUIRE_LUA = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 5: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_conc = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local member = ARGV[4]
local lease_ms = tonumber(ARGV[5])
local in_window = 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  in_window = redis.call('ZCARD', KEYS[2])
  if in_window >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, 2, tonumber(oldest[2]) + 60000 - now, in_window, 0, 0}
  end
end
local tokens = 0
if tpm > 0 then
  local oldest_live = tonumber(t[1]) - 59  -- a second's tokens count for 60 s
  local fields = redis.call('HGETALL', KEYS[3])
  local live = {}
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second < oldest_live then
      redis.call('HDEL', KEYS[3], fields[i])
    else
      local used = tonumber(fields[i + 1])
      tokens = tokens + used
      live[#live + 1] = {second, used}
    end
  end
  if tokens >= tpm then
    table.sort(live, function(a, b) return a[1] < b[1] end)
    local left = tokens
    local retry = 60000
    for _, entry in ipairs(live) do
      left = left - entry[2]
      if left < tpm then
        retry = (entry[1] + 60) * 1000 - now
        break
      end
    end
    return {0, 3, retry, in_window, 0, tokens}
  end
end
local in_flight = 0
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[1])
  if in_flight >= max_conc then
    return {0, 1, 1000, in_window, in_flight, tokens}
  end
  redis.call('ZADD', KEYS[1], now + lease_ms, member)
  redis.call('PEXPIRE', KEYS[1], lease_ms)
  in_flight = in_flight + 1
end
if rpm > 0 then
  redis.call('ZADD', KEYS[2], now, member)
  redis.call('PEXPIRE', KEYS[2], 60000)
  in_window = in_window + 1
end
return {1, 0, 0, in_window, in_flight, tokens}
"""

# KEYS: tpm. ARGV: tokens. The tokens of a request that ended, in the current second's field.
COUNT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
redis.call('HINCRBY', KEYS[1], t[1], tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], 61000)
return 1
"""

# KEYS: conc. ARGV: lease_ms, member... Every lease of this worker still running gets a new
# expiry (re-added if Redis lost it: the request is really in flight).
RENEW_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return #ARGV - 1
"""


ACQUIRE_SHA = hashlib.sha1(ACQUIRE_LUA.encode()).hexdigest()


def _bulk(value: str | int) -> bytes:
    data = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class LimiterUnavailable(Exception):
    """Redis could not be reached at start; the message names LIMITS_REDIS_URL."""


# ---------------------------------------------------------------------------- per token, per table


def limit_key_id(token: str, token_id: int | str | None) -> str:
    """The Redis id of a token: ``i<token_id>`` when the id is short and plain, else ``h<first 16
    hex of sha256(token)>``. Never the token itself (Redis, its logs and MONITOR see the keys)."""
    if token_id is not None:
        text = str(token_id)
        if _SAFE_ID(text):
            return "i" + text
    return "h" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


_PACKED_HEAD = b"*11\r\n" + _bulk("EVALSHA") + _bulk(ACQUIRE_SHA) + _bulk(3)


@functools.lru_cache(maxsize=1024)
def _packed_limits(max_concurrency: int, rpm: int, tpm: int) -> tuple[bytes, str]:
    return _bulk(max_concurrency) + _bulk(rpm) + _bulk(tpm), str(rpm or max_concurrency)


@dataclass(slots=True)
class TokenLimits:
    """A token's effective limits (0 = that limit is off; never all three) and its Redis keys.
    Built once per table version (kept across versions while unchanged), so acquire() does no
    string work. Treat as read-only."""

    max_concurrency: int
    rpm: int
    key_id: str
    keys: tuple[str, str]  # (conc, rpm)
    header_limit: str  # x-ratelimit-limit-requests: the rpm limit if set, else max_concurrency
    packed: bytes  # the EVALSHA command up to the per-request arguments, in the wire format
    tpm: int = 0
    tpm_key: str = ""  # "" when tpm is 0: nothing to count

    @classmethod
    def build(cls, max_concurrency: int, rpm: int, key_id: str, tpm: int = 0) -> TokenLimits:
        conc_key = f"{KEY_PREFIX}{{{key_id}}}:conc"
        rpm_key = f"{KEY_PREFIX}{{{key_id}}}:rpm"
        tpm_key = f"{KEY_PREFIX}{{{key_id}}}:tpm"
        args, header_limit = _packed_limits(max_concurrency, rpm, tpm)
        packed = _PACKED_HEAD + b"".join(_bulk(key) for key in (conc_key, rpm_key, tpm_key)) + args
        # KEYS[3] of every EVALSHA, but only a token with a TPM limit has its tokens counted.
        counted = tpm_key if tpm else ""
        return cls(max_concurrency, rpm, key_id, (conc_key, rpm_key), header_limit, packed, tpm, counted)


def effective_limits(
    token: str,
    token_id: int | str | None,
    row_concurrency: int | None,
    row_rpm: int | None,
    default_concurrency: int,
    default_rpm: int,
    row_tpm: int | None = None,
    default_tpm: int = 0,
) -> TokenLimits | None:
    """The row's override (0 = unlimited for this token) or the default; None when all are 0."""
    concurrency = default_concurrency if row_concurrency is None else row_concurrency
    rpm = default_rpm if row_rpm is None else row_rpm
    tpm = default_tpm if row_tpm is None else row_tpm
    if not concurrency and not rpm and not tpm:
        return None
    return TokenLimits.build(concurrency, rpm, limit_key_id(token, token_id), tpm)


# ---------------------------------------------------------------------------- admissions


class Admission:
    """The answer of acquire(). ``admitted`` False = answer 429 with ``code``, ``retry_after`` and
    ``headers``; True = forward, send ``headers`` with the response, and release() when it ends."""

    __slots__ = (
        "__weakref__",
        "admitted",
        "conc_key",
        "enforced",
        "headers",
        "limit",
        "member",
        "retry_after",
        "tpm_key",
    )

    def __init__(
        self,
        admitted: bool,
        limit: str = "",
        retry_after: int = 0,
        headers: tuple[tuple[str, str], ...] = (),
        conc_key: str = "",
        member: str = "",
        enforced: bool = False,
        tpm_key: str = "",
    ) -> None:
        self.admitted = admitted
        self.limit = limit  # "" when admitted; else CONCURRENCY, RPM or TPM (the access line's "limit")
        self.retry_after = retry_after  # whole seconds, >= 1 when refused
        self.headers = headers  # x-ratelimit-{limit,remaining}-requests and/or -tokens
        self.conc_key = conc_key  # set while this admission holds a concurrency lease
        self.member = member
        self.enforced = enforced  # False: no limit applied (unlimited token, no Redis, outage)
        self.tpm_key = tpm_key  # a TPM-limited admission: its tokens are counted when it ends

    @property
    def code(self) -> str:
        return CODES.get(self.limit, "")

    @property
    def message(self) -> str:
        return MESSAGES.get(self.limit, "")

    def __repr__(self) -> str:
        return (
            f"Admission(admitted={self.admitted}, limit={self.limit!r}, retry_after={self.retry_after}, "
            f"headers={self.headers!r}, lease={bool(self.conc_key)}, enforced={self.enforced})"
        )


UNLIMITED = Admission(True)  # shared: nothing to release, no headers


def _headers(limits: TokenLimits, in_window: int, in_flight: int, tokens: int) -> tuple[tuple[str, str], ...]:
    headers: tuple[tuple[str, str], ...] = ()
    if limits.rpm or limits.max_concurrency:
        remaining = limits.rpm - in_window if limits.rpm else limits.max_concurrency - in_flight
        headers = (
            ("x-ratelimit-limit-requests", limits.header_limit),
            ("x-ratelimit-remaining-requests", str(max(remaining, 0))),
        )
    if limits.tpm:
        headers += (
            ("x-ratelimit-limit-tokens", str(limits.tpm)),
            ("x-ratelimit-remaining-tokens", str(max(limits.tpm - tokens, 0))),
        )
    return headers


# ---------------------------------------------------------------------------- the limiter


class Limiter:
    """One per worker. ``Limiter("")`` is a disabled limiter: every acquire() is UNLIMITED."""

    def __init__(
        self, url: str, lease_seconds: float = 30.0, *, socket_timeout: float = SOCKET_TIMEOUT
    ) -> None:
        self.url = url
        self.shown_url = without_password(url)
        self.enabled = bool(url)
        self.lease_seconds = lease_seconds
        self.lease_ms = str(max(1, round(lease_seconds * 1000)))
        self.renew_every = lease_seconds / 3.0
        # Counters the metrics read (monotonic; per worker).
        self.refused = {CONCURRENCY: 0, RPM: 0, TPM: 0}
        self.outages_total = 0
        self.unenforced_total = 0  # limited requests admitted unchecked because Redis was down
        self.dropped_total = 0  # admissions released by the garbage collector, not release()
        self.down_since: float | None = None  # monotonic time of the outage's start, None = up
        self._in_flight: dict[str, str] = {}  # member -> conc key, for renewal
        self._pending: list[tuple[str, str]] = []  # (conc key, member) to remove
        self._counts: list[tuple[str, int]] = []  # (tpm key, tokens) to add
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        self._closing = False
        self._ids = itertools.count(1)
        self._member_prefix = f"{os.getpid():x}.{os.urandom(4).hex()}."
        self._next_renewal = 0.0
        self._last_probe = 0.0
        self._lease_arg = _bulk(self.lease_ms)
        # The request path's connections: a free list and a cap (a greenlet waits for a free
        # one); a connection that saw any error is closed, never reused half-read.
        self._idle: list[redis.connection.AbstractConnection] = []
        self._slots = BoundedSemaphore(POOL_SIZE)
        if not self.enabled:
            self.client = None
            return
        options = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),  # no retries: an error trips the breaker at once
        }
        factory = redis.ConnectionPool.from_url(url, **options)
        self._new_connection = lambda: factory.connection_class(**factory.connection_kwargs)
        # The background greenlet's client (pipelines, probes) and check_reachable().
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool.from_url(url, max_connections=4, **options)
        )
        self._renew_script = self.client.register_script(RENEW_LUA)
        self._count_script = self.client.register_script(COUNT_LUA)

    @classmethod
    def from_config(cls, config) -> Limiter:
        """From a ProxyConfig: disabled when LIMITS_REDIS_URL is not set."""
        return cls(config.limits_redis_url, config.limits_lease_seconds)

    # -- start and stop

    def check_reachable(self, wait: float = 10.0, *, fail: bool = True) -> bool:
        """At start: PING and load the scripts, retrying for ``wait`` seconds (so the order in
        which supervisord starts redis and the workers does not matter). Unreachable: raises
        LimiterUnavailable naming LIMITS_REDIS_URL, or with ``fail=False`` starts in the outage
        state (one error line; unlimited until the background greenlet sees Redis) and returns
        False."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + wait
        while True:
            try:
                self.client.ping()
                self.client.script_load(ACQUIRE_LUA)
                self._renew_script.sha = self.client.script_load(RENEW_LUA)
                self._count_script.sha = self.client.script_load(COUNT_LUA)
                return True
            except (redis.RedisError, OSError) as exc:
                if time.monotonic() >= deadline:
                    if not fail:
                        self._went_down(exc)
                        return False
                    raise LimiterUnavailable(
                        f"LIMITS_REDIS_URL={self.shown_url!r}: cannot reach Redis after {wait:g} s "
                        f"({_describe(exc)})"
                    ) from None
                gevent.sleep(0.2)

    def start(self) -> gevent.Greenlet | None:
        """Start the background greenlet (releases, renewals, probes)."""
        if self.enabled and self._greenlet is None:
            self._next_renewal = time.monotonic() + self.renew_every
            self._greenlet = gevent.spawn(self._run)
        return self._greenlet

    def close(self, timeout: float = 2.0) -> None:
        """At worker exit: send the pending releases and release every lease still held."""
        if not self.enabled:
            return
        self._closing = True
        for member, key in list(self._in_flight.items()):
            self._pending.append((key, member))
        self._in_flight.clear()
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=timeout)
            self._greenlet = None
        try:
            with gevent.Timeout(timeout, False):
                self._flush_releases()
        except (redis.RedisError, OSError):
            pass  # Redis down: the leases expire on their own within one lease
        self.client.connection_pool.disconnect()
        for connection in self._idle:
            connection.disconnect()
        self._idle.clear()

    # -- the request path

    def acquire(self, limits: TokenLimits | None) -> Admission:
        """One round trip for a limited token; nothing at all for an unlimited one."""
        if limits is None or not self.enabled:
            return UNLIMITED
        if self.down_since is not None:
            self.unenforced_total += 1
            return UNLIMITED
        member = self._member_prefix + format(next(self._ids), "x")
        try:
            admitted, refused_by, retry_ms, in_window, in_flight, tokens = self._call(
                limits.packed + _bulk(member) + self._lease_arg
            )
        except (redis.RedisError, OSError) as exc:
            self._went_down(exc)
            self.unenforced_total += 1
            return UNLIMITED
        headers = _headers(limits, in_window, in_flight, tokens)
        if not admitted:
            limit = RPM if refused_by == 2 else TPM if refused_by == 3 else CONCURRENCY
            self.refused[limit] += 1
            retry_after = max(1, math.ceil(retry_ms / 1000))
            return Admission(False, limit, retry_after, headers, enforced=True)
        if limits.max_concurrency:
            self._in_flight[member] = limits.keys[0]
            admission = Admission(
                True, "", 0, headers, limits.keys[0], member, enforced=True, tpm_key=limits.tpm_key
            )
            # A safety net, not the way: an admission dropped without release() (a bug, an
            # exception between acquire and the request's finally) would be renewed for ever.
            weakref.finalize(admission, self._dropped, member).atexit = False
            return admission
        return Admission(True, "", 0, headers, enforced=True, tpm_key=limits.tpm_key)

    def _call(self, command: bytes):
        """Send one packed EVALSHA and read its reply on a connection of the request path's own
        (redis-py's client would pack, log and check the connection again: twice the CPU)."""
        with self._slots:
            connection = self._idle.pop() if self._idle else self._new_connection()
            try:
                connection.send_packed_command((command,), check_health=False)
                try:
                    reply = connection.read_response()
                except redis.exceptions.NoScriptError:  # Redis restarted: load it, send again
                    connection.send_command("SCRIPT", "LOAD", ACQUIRE_LUA, check_health=False)
                    connection.read_response()
                    connection.send_packed_command((command,), check_health=False)
                    reply = connection.read_response()
            except BaseException:
                connection.disconnect()
                raise
            self._idle.append(connection)
            return reply

    def release(self, admission: Admission) -> None:
        """Give the concurrency slot back (idempotent; never blocks: the background greenlet sends it)."""
        key = admission.conc_key
        if not key:
            return
        admission.conc_key = ""
        self._in_flight.pop(admission.member, None)
        self._pending.append((key, admission.member))
        self._wake.set()

    def count(self, admission: Admission, tokens: int) -> None:
        """Add a finished request's tokens to its token's TPM window (once; never blocks: the
        background greenlet sends it with the releases)."""
        key = admission.tpm_key
        if not key or tokens <= 0:
            return
        admission.tpm_key = ""
        self._counts.append((key, tokens))
        self._wake.set()

    def _dropped(self, member: str) -> None:
        key = self._in_flight.pop(member, None)
        if key is not None:
            self.dropped_total += 1
            self._pending.append((key, member))
            self._wake.set()

    @property
    def in_flight_leases(self) -> int:
        return len(self._in_flight)

    # -- outage breaker

    def _went_down(self, exc: BaseException) -> None:
        if self.down_since is not None:
            return
        self.down_since = self._last_probe = time.monotonic()
        self.outages_total += 1
        self._drop_connections()
        self._wake.set()  # the background loop switches to probing now, not at its next renewal
        log.error(
            "limits: Redis unreachable; serving without per-token limits until it answers again",
            extra={"event": "limits_redis_down", "url": self.shown_url, "error": _describe(exc)},
        )

    def _drop_connections(self) -> None:
        """Close every connection that lived through an outage: one of them used after Redis came
        back would fail (a broken pipe) and start a new outage for each."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()
        self.client.connection_pool.disconnect()

    def _came_back(self) -> None:
        self._drop_connections()
        started, self.down_since = self.down_since, None
        log.info(
            "limits: Redis answers again; per-token limits enforced",
            extra={
                "event": "limits_redis_up",
                "url": self.shown_url,
                "outage_s": round(time.monotonic() - (started or time.monotonic()), 3),
            },
        )

    # -- background: releases, renewals, probes

    def _run(self) -> None:
        while not self._closing:
            try:
                self._turn()
            except Exception:  # the loop must outlive any fault: leases would expire
                log.exception("limits: background loop error", extra={"event": "limits_loop_error"})
                gevent.sleep(PROBE_INTERVAL)

    def _turn(self) -> None:
        if self.down_since is not None:
            gevent.sleep(max(0.0, self._last_probe + PROBE_INTERVAL - time.monotonic()))
            self._last_probe = time.monotonic()
            try:
                self.client.ping()
            except (redis.RedisError, OSError):
                return
            self._came_back()
            self._next_renewal = 0.0  # renew at once: leases may have lapsed meanwhile
        else:
            self._wake.wait(max(0.0, self._next_renewal - time.monotonic()))
            self._wake.clear()
        try:
            self._flush_releases()
            if time.monotonic() >= self._next_renewal:
                self._next_renewal = time.monotonic() + self.renew_every
                self._renew()
        except (redis.RedisError, OSError) as exc:
            self._went_down(exc)

    def _flush_releases(self) -> None:
        if not self._pending and not self._counts:
            return
        batch, self._pending = self._pending, []
        counts, self._counts = self._counts, []
        pipe = self.client.pipeline(transaction=False)
        for key, member in batch:
            pipe.zrem(key, member)
        for key, tokens in counts:
            self._count_script(keys=(key,), args=(tokens,), client=pipe)
        try:
            pipe.execute()
        except BaseException:
            self._pending[:0] = batch  # sent again once Redis answers (until the lease expires anyway)
            self._counts[:0] = counts
            raise

    def _renew(self) -> None:
        if not self._in_flight:
            return
        by_key: dict[str, list[str]] = {}
        for member, key in self._in_flight.items():
            by_key.setdefault(key, []).append(member)
        pipe = self.client.pipeline(transaction=False)
        for key, members in by_key.items():
            self._renew_script(keys=(key,), args=(self.lease_ms, *members), client=pipe)
        pipe.execute()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
