"""Per-token limits (issue 14), the parts below the request path: configuration, the effective
limits resolved per table version, and proxyapp/limits.py against a real redis-server (unix
socket, started by the ``redis_server`` fixture and stopped by PID).

The Limiter runs in this process under gevent (its background greenlet runs whenever a test
sleeps through gevent); the "several workers" tests run monkey-patched worker-like processes
(tests/support/limits_worker.py) against the same Redis.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import subprocess
import threading
import time
import uuid

import gevent
import pytest
import redis

from common import tokentable
from common.envparse import ConfigError
from proxyapp import limits as limits_module
from proxyapp.config import ProxyConfig
from proxyapp.errors import error_body
from proxyapp.limits import (
    CONCURRENCY,
    RPM,
    TPM,
    UNLIMITED,
    Limiter,
    LimiterUnavailable,
    TokenLimits,
    effective_limits,
    limit_key_id,
)
from proxyapp.table_store import LimitSettings, TableStore, build_routes
from tests.support.procs import PYTHON, REPO, Process, wait_for
from tests.support.tables import make_table, row, write_table

TOKEN = "sk-limits-canary-0a1b2c3d4e5f60718293"


def gwait(predicate, timeout: float = 10.0, what: str = ""):
    """wait_for that sleeps through gevent, so the limiter's background greenlet runs meanwhile."""
    return wait_for(predicate, timeout, what=what, sleep=gevent.sleep)


def token_limits(conc: int = 0, rpm: int = 0) -> TokenLimits:
    return TokenLimits.build(conc, rpm, "t" + uuid.uuid4().hex[:12])  # a fresh token per test


@pytest.fixture
def inspect(redis_server):
    client = redis.Redis(unix_socket_path=str(redis_server.socket), socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def limiter_factory(redis_server):
    made: list[Limiter] = []

    def make(lease: float = 30.0, url: str | None = None, start: bool = True) -> Limiter:
        limiter = Limiter(redis_server.url if url is None else url, lease)
        if start:
            limiter.check_reachable(5)
            limiter.start()
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close(timeout=1)


def limit_events(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


# ---------------------------------------------------------------------------- configuration


def test_config_defaults_change_nothing():
    config = ProxyConfig.from_env({})
    assert (config.token_max_concurrency, config.token_rpm) == (0, 0)
    assert config.limits_redis_url == ""
    assert config.limits_lease_seconds == 30.0
    assert config.limits_by_env is False


def test_config_values():
    config = ProxyConfig.from_env(
        {
            "TOKEN_MAX_CONCURRENCY": "4",
            "TOKEN_RPM": "120",
            "LIMITS_REDIS_URL": "redis://:pw@10.0.0.5:6380/2",
            "LIMITS_LEASE_SECONDS": "12.5",
        }
    )
    assert (config.token_max_concurrency, config.token_rpm) == (4, 120)
    assert config.limits_redis_url == "redis://:pw@10.0.0.5:6380/2"
    assert config.limits_lease_seconds == 12.5
    assert config.limits_by_env is True
    unix = ProxyConfig.from_env({"TOKEN_RPM": "1", "LIMITS_REDIS_URL": "unix:///run/x/redis.sock"})
    assert unix.limits_redis_url == "unix:///run/x/redis.sock"


@pytest.mark.parametrize("name", ["TOKEN_MAX_CONCURRENCY", "TOKEN_RPM", "TOKEN_TPM"])
def test_a_limit_by_env_without_redis_is_a_start_up_error_naming_the_variable(name):
    with pytest.raises(ConfigError) as caught:
        ProxyConfig.from_env({name: "3"})
    assert caught.value.name == name
    assert "LIMITS_REDIS_URL" in str(caught.value)
    ProxyConfig.from_env({name: "0"})  # 0 = unlimited: no Redis needed


@pytest.mark.parametrize(
    ("env", "name", "reason"),
    [
        ({"TOKEN_RPM": "-1"}, "TOKEN_RPM", "at least 0"),
        ({"TOKEN_RPM": "1.5"}, "TOKEN_RPM", "whole number"),
        ({"TOKEN_TPM": "-5"}, "TOKEN_TPM", "at least 0"),
        ({"TOKEN_TPM": "10k"}, "TOKEN_TPM", "whole number"),
        ({"STREAM_USAGE": "always"}, "STREAM_USAGE", "passthrough, request"),
        ({"TOKEN_MAX_CONCURRENCY": "many"}, "TOKEN_MAX_CONCURRENCY", "whole number"),
        ({"TOKEN_MAX_CONCURRENCY": "1000000001"}, "TOKEN_MAX_CONCURRENCY", "at most"),
        ({"LIMITS_REDIS_URL": "http://h:6379"}, "LIMITS_REDIS_URL", "expected redis://"),
        ({"LIMITS_REDIS_URL": "redis://"}, "LIMITS_REDIS_URL", "expected redis://host"),
        ({"LIMITS_REDIS_URL": "redis://h:99999"}, "LIMITS_REDIS_URL", "bad port"),
        ({"LIMITS_REDIS_URL": "redis://h/x"}, "LIMITS_REDIS_URL", "database number"),
        ({"LIMITS_REDIS_URL": "unix://relative.sock"}, "LIMITS_REDIS_URL", "absolute"),
        ({"LIMITS_LEASE_SECONDS": "0"}, "LIMITS_LEASE_SECONDS", "at least 1"),
        ({"LIMITS_LEASE_SECONDS": "soon"}, "LIMITS_LEASE_SECONDS", "a number"),
    ],
)
def test_config_errors_name_the_variable(env, name, reason):
    with pytest.raises(ConfigError) as caught:
        ProxyConfig.from_env(env)
    assert caught.value.name == name
    assert reason in str(caught.value)


def test_a_redis_url_error_never_repeats_the_password():
    with pytest.raises(ConfigError) as caught:
        ProxyConfig.from_env({"LIMITS_REDIS_URL": "redis://user:hunter2-secret@/x"})
    assert "hunter2-secret" not in str(caught.value)
    assert "***" in str(caught.value)


# ---------------------------------------------------------------------------- effective limits


def test_key_id_is_the_token_id_or_a_hash_never_the_token():
    assert limit_key_id(TOKEN, 7) == "i7"
    assert limit_key_id(TOKEN, "tok-42.a_b") == "itok-42.a_b"
    hashed = limit_key_id(TOKEN, None)
    assert hashed.startswith("h") and len(hashed) == 17
    assert hashed == limit_key_id(TOKEN, None)  # stable across table versions and workers
    assert hashed != limit_key_id(TOKEN + "x", None)
    for odd_id in ("has space", "a{b}c", "x" * 65, ""):  # unsafe or odd ids: hashed as well
        assert limit_key_id(TOKEN, odd_id) == hashed
    for key_id in (hashed, "i7"):
        keys = TokenLimits.build(1, 1, key_id).keys
        assert keys == (f"llmproxy:{{{key_id}}}:conc", f"llmproxy:{{{key_id}}}:rpm")
        assert all(TOKEN not in key and TOKEN[3:20] not in key for key in keys)


def test_effective_limits_override_or_default():
    assert effective_limits(TOKEN, 1, None, None, 0, 0) is None
    assert effective_limits(TOKEN, 1, 0, 0, 5, 60) is None  # 0 in the row: unlimited for this token
    both = effective_limits(TOKEN, 1, None, None, 5, 60)
    assert (both.max_concurrency, both.rpm, both.header_limit) == (5, 60, "60")
    mixed = effective_limits(TOKEN, 1, 1, None, 5, 60)
    assert (mixed.max_concurrency, mixed.rpm) == (1, 60)
    only_conc = effective_limits(TOKEN, 1, 2, None, 0, 0)
    assert (only_conc.max_concurrency, only_conc.rpm, only_conc.header_limit) == (2, 0, "2")


def test_routes_carry_the_limits_resolved_once_per_table_version():
    table = make_table(
        {
            TOKEN: row("http://u/v1", token_id=7),
            "sk-one": row("http://u/v1", token_id=8, token_max_concurrency=1),
            "sk-exempt": row("http://u/v1", token_id=9, token_max_concurrency=0, token_rpm=0),
            "sk-noid": row("http://u/v1", token_id=None, token_rpm=30),
        }
    )
    unlimited = build_routes(table)
    assert [route.limits for route in unlimited.values()] == [
        None,
        TokenLimits.build(1, 0, "i8"),
        None,
        unlimited["sk-noid"].limits,
    ]
    assert unlimited["sk-noid"].limits.rpm == 30
    routes = build_routes(table, limits=LimitSettings(default_concurrency=2, default_rpm=0, enforced=True))
    assert routes[TOKEN].limits == TokenLimits.build(2, 0, "i7")
    assert routes["sk-one"].limits == TokenLimits.build(1, 0, "i8")
    assert routes["sk-exempt"].limits is None
    assert routes["sk-noid"].limits == TokenLimits.build(2, 30, limit_key_id("sk-noid", None))
    assert routes[TOKEN].upstream is routes["sk-one"].upstream  # still shared per model


def test_limits_in_the_table_without_redis_warn_once_per_table_version(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.table")
    path = tmp_path / "tokens.json"
    write_table(path, {TOKEN: row("http://u/v1", token_max_concurrency=1)})
    store = TableStore(str(path), 0.1)  # no Redis: LimitSettings().enforced is False
    assert store.check() is True
    assert store.current.limited_tokens == 1
    assert store.current.routes[TOKEN].limits.max_concurrency == 1
    assert store.check() is False  # same version: no second warning
    assert len(limit_events(caplog, "limits_not_enforced")) == 1
    write_table(path, {TOKEN: row("http://u/v1", token_max_concurrency=1), "sk-b": row("http://u/v1")})
    assert store.check() is True
    warnings = limit_events(caplog, "limits_not_enforced")
    assert len(warnings) == 2
    assert warnings[-1].levelno == logging.WARNING
    assert warnings[-1].limited_tokens == 1


def test_no_warning_when_enforced_or_when_the_table_has_no_limits(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.table")
    path = tmp_path / "tokens.json"
    write_table(path, {TOKEN: row("http://u/v1", token_rpm=10)})
    assert TableStore(str(path), 0.1, LimitSettings(enforced=True)).check() is True
    write_table(path, {TOKEN: row("http://u/v1")})
    assert TableStore(str(path), 0.1).check() is True
    assert limit_events(caplog, "limits_not_enforced") == []
    assert [r.limited_tokens for r in limit_events(caplog, "table_loaded")] == [1, 0]


def test_table_lookup_shows_the_limits(tmp_path):
    path = tmp_path / "tokens.json"
    write_table(
        path,
        {
            TOKEN: row("http://u/v1", token_id=7, token_max_concurrency=1, token_tpm=500),
            "sk-plain-0001": row("http://u/v1"),
        },
    )
    env = {"TOKEN_RPM": "90", "TOKEN_TPM": "2000", "TOKEN_FILE": str(path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [PYTHON, "-m", "proxyapp.table", "lookup", TOKEN], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["token_max_concurrency"], shown["token_rpm"]) == (1, None)
    assert (shown["max_concurrency"], shown["rpm"], shown["limit_key_id"]) == (1, 90, "i7")
    assert (shown["token_tpm"], shown["tpm"]) == (500, 500)  # the row's override
    assert TOKEN not in result.stdout
    result = subprocess.run(
        [PYTHON, "-m", "proxyapp.table", "show"],
        cwd=REPO,
        env={**env, "TOKEN_RPM": "0", "TOKEN_TPM": "0"},
        capture_output=True,
        text=True,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_id = {line.get("token_id"): line for line in lines[1:]}
    assert (by_id[7]["max_concurrency"], by_id[7]["rpm"]) == (1, 0)
    assert (by_id[1]["max_concurrency"], by_id[1]["rpm"], by_id[1]["limit_key_id"]) == (0, 0, None)


# ---------------------------------------------------------------------------- the limiter


def test_unlimited_tokens_cost_nothing():
    # Pointed at a socket nobody listens on: any Redis call would fail and open the breaker.
    limiter = Limiter("unix:///nonexistent/redis.sock")
    for _ in range(3):
        assert limiter.acquire(None) is UNLIMITED
    assert limiter.outages_total == 0
    assert limiter.unenforced_total == 0
    disabled = Limiter("")
    assert disabled.enabled is False
    assert disabled.acquire(token_limits(conc=1)) is UNLIMITED
    disabled.check_reachable(0)  # nothing to reach
    disabled.release(UNLIMITED)


def test_rpm_admits_exactly_n_of_m_then_refuses_with_retry_after(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(rpm=5)
    answers = [limiter.acquire(limits) for _ in range(8)]
    assert [a.admitted for a in answers] == [True] * 5 + [False] * 3
    assert [dict(a.headers)["x-ratelimit-remaining-requests"] for a in answers] == [
        "4", "3", "2", "1", "0", "0", "0", "0",
    ]  # fmt: skip
    assert {dict(a.headers)["x-ratelimit-limit-requests"] for a in answers} == {"5"}
    for refused in answers[5:]:
        assert (refused.limit, refused.code) == (RPM, "token_rate_limit")
        assert 1 <= refused.retry_after <= 60
        assert refused.enforced
    assert limiter.refused == {CONCURRENCY: 0, RPM: 3, TPM: 0}
    assert all(not a.conc_key for a in answers)  # rpm only: nothing to release
    assert inspect.zcard(limits.keys[1]) == 5  # refusals are not counted as admissions
    assert 0 < inspect.pttl(limits.keys[1]) <= 60_000  # an idle token's keys go away
    assert inspect.exists(limits.keys[0]) == 0


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_retry_after_is_when_the_oldest_admission_leaves_the_window(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(rpm=2)
    # An admission made 50 s ago (Redis time) and one now: the window is full for another ~10 s.
    inspect.zadd(limits.keys[1], {"old": redis_now_ms(inspect) - 50_000})
    assert limiter.acquire(limits).admitted
    refused = limiter.acquire(limits)
    assert not refused.admitted
    assert 9 <= refused.retry_after <= 11
    # One that is about to leave the window: Retry-After 1, and admitted once it has left.
    inspect.zadd(limits.keys[1], {"old": redis_now_ms(inspect) - 59_700})
    refused = limiter.acquire(limits)
    assert (refused.admitted, refused.retry_after) == (False, 1)
    admitted = gwait(lambda: limiter.acquire(limits).admitted, timeout=5, what="the old admission to leave")
    assert admitted
    assert inspect.zscore(limits.keys[1], "old") is None


def test_concurrency_slot_is_taken_then_released(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(conc=2)
    first, second = limiter.acquire(limits), limiter.acquire(limits)
    assert first.admitted and second.admitted
    assert dict(first.headers) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1"}
    assert dict(second.headers)["x-ratelimit-remaining-requests"] == "0"
    refused = limiter.acquire(limits)
    assert (refused.admitted, refused.limit, refused.code, refused.retry_after) == (
        False, CONCURRENCY, "token_concurrency_limit", 1,
    )  # fmt: skip
    assert limiter.in_flight_leases == 2
    limiter.release(first)
    limiter.release(first)  # idempotent: the second slot stays taken
    assert limiter.in_flight_leases == 1
    gwait(lambda: inspect.zcard(limits.keys[0]) == 1, timeout=5, what="the release to reach Redis")
    third = limiter.acquire(limits)
    assert third.admitted
    assert not limiter.acquire(limits).admitted
    limiter.release(second)
    limiter.release(third)
    gwait(lambda: inspect.zcard(limits.keys[0]) == 0, timeout=5, what="both releases")
    assert limiter.refused == {CONCURRENCY: 2, RPM: 0, TPM: 0}


def test_both_limits_together_the_rpm_refusal_wins_and_nothing_is_taken(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(conc=1, rpm=2)
    first = limiter.acquire(limits)
    assert dict(first.headers) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1"}
    busy = limiter.acquire(limits)
    assert (busy.admitted, busy.limit) == (False, CONCURRENCY)
    assert inspect.zcard(limits.keys[1]) == 1  # the refused request used no minute quota
    limiter.release(first)
    gwait(lambda: inspect.zcard(limits.keys[0]) == 0, timeout=5, what="the release")
    assert limiter.acquire(limits).admitted  # 2 of 2 this minute, 1 in flight
    over = limiter.acquire(limits)
    assert (over.admitted, over.limit) == (False, RPM)
    assert over.retry_after > 1


def test_an_unreleased_lease_that_is_not_renewed_frees_its_slot_within_one_lease(limiter_factory, inspect):
    lost = limiter_factory(lease=1.0, start=False)  # as a worker killed mid-request: no renewal
    lost.check_reachable(5)
    limits = token_limits(conc=1)
    assert lost.acquire(limits).admitted
    other = limiter_factory(lease=1.0)
    assert not other.acquire(limits).admitted
    started = time.monotonic()
    gwait(lambda: other.acquire(limits).admitted, timeout=5, what="the lease to expire")
    assert time.monotonic() - started <= 5  # generous bound: the lease is 1 s


def test_renewal_keeps_a_running_request_past_its_lease(limiter_factory, inspect):
    holder = limiter_factory(lease=1.0)
    limits = token_limits(conc=1)
    held = holder.acquire(limits)
    assert held.admitted
    other = limiter_factory(lease=1.0)
    deadline = time.monotonic() + 3.5  # three and a half leases
    while time.monotonic() < deadline:
        assert not other.acquire(limits).admitted
        gevent.sleep(0.1)
    holder.release(held)
    assert gwait(lambda: other.acquire(limits).admitted, timeout=5, what="the released slot")


def test_close_releases_every_lease_still_held(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(conc=3)
    for _ in range(3):
        assert limiter.acquire(limits).admitted
    assert inspect.zcard(limits.keys[0]) == 3
    limiter.close(timeout=2)
    assert inspect.zcard(limits.keys[0]) == 0


def test_outage_admits_without_limits_logs_once_and_enforces_again_when_back(
    redis_server, limiter_factory, caplog
):
    caplog.set_level(logging.INFO, logger="proxy.limits")
    limiter = limiter_factory()
    limits = token_limits(rpm=1)
    assert limiter.acquire(limits).admitted
    assert not limiter.acquire(limits).admitted
    redis_server.stop()
    answers = [limiter.acquire(limits) for _ in range(5)]
    assert all(a.admitted and not a.enforced and a.headers == () for a in answers)
    gevent.sleep(2.5)  # the background greenlet probes (and fails) meanwhile
    answers += [limiter.acquire(limits) for _ in range(5)]
    assert all(a.admitted for a in answers)
    assert limiter.outages_total == 1
    assert limiter.unenforced_total == 10
    down = limit_events(caplog, "limits_redis_down")
    assert len(down) == 1
    assert down[0].levelno == logging.ERROR
    assert redis_server.url in down[0].url
    redis_server.start()  # back, and empty (no persistence): the scripts are loaded again
    gwait(lambda: limiter.down_since is None, timeout=10, what="the limiter to see Redis again")
    assert len(limit_events(caplog, "limits_redis_up")) == 1
    assert limiter.acquire(limits).admitted
    refused = limiter.acquire(limits)
    assert (refused.admitted, refused.limit, refused.enforced) == (False, RPM, True)
    # A second outage is a second error line.
    redis_server.stop()
    assert limiter.acquire(limits).admitted
    assert limiter.outages_total == 2
    assert len(limit_events(caplog, "limits_redis_down")) == 2


def test_a_lease_taken_before_an_outage_is_released_after_it(redis_server, limiter_factory, inspect):
    limiter = limiter_factory(lease=3.0)
    limits = token_limits(conc=1)
    held = limiter.acquire(limits)
    assert held.admitted
    redis_server.stop()
    limiter.release(held)  # Redis is down: the release waits in the queue
    gevent.sleep(0.3)
    redis_server.start()
    inspect.connection_pool.disconnect()
    gwait(lambda: limiter.down_since is None and not limiter._pending, timeout=10, what="the queued release")
    # Redis came back empty and the release went through: the slot is free, nothing renewed it back.
    assert limiter.acquire(limits).admitted


def test_check_reachable_waits_for_a_late_redis_then_fails_naming_the_variable(redis_server, tmp_path):
    redis_server.stop()
    starter = threading.Timer(0.8, redis_server.start)
    starter.start()
    try:
        Limiter(redis_server.url).check_reachable(wait=10)  # supervisord's start order does not matter
    finally:
        starter.join()
    missing = Limiter(f"unix://{tmp_path}/none.sock")
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable) as caught:
        missing.check_reachable(wait=0.5)
    assert "LIMITS_REDIS_URL" in str(caught.value)
    assert "none.sock" in str(caught.value)
    assert time.monotonic() - started < 5
    with pytest.raises(LimiterUnavailable) as caught:
        Limiter("redis://user:sup3r-secret@127.0.0.1:1/0").check_reachable(wait=0.2)
    assert "sup3r-secret" not in str(caught.value)


# ---------------------------------------------------------------------------- several workers


def worker(redis_server, tmp_path, mode: str, limits: TokenLimits, count: int, lease: float, start_at=0.0):
    args = [
        PYTHON, "-m", "tests.support.limits_worker", mode, redis_server.url, limits.key_id,
        str(limits.max_concurrency), str(limits.rpm), str(count), str(lease), str(start_at),
    ]  # fmt: skip
    return Process(args, env={}, log_path=tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log")


def printed(process: Process) -> dict:
    def first_line():
        lines = [line for line in process.json_lines() if "admitted" in line or "held" in line]
        assert process.alive(), process.output()
        return lines[0] if lines else None

    return wait_for(first_line, timeout=20, what="the worker's result")


@pytest.mark.parametrize(("conc", "rpm", "expected"), [(0, 25, 25), (3, 0, 3), (4, 30, 4)])
def test_two_gevent_workers_admit_exactly_the_limit_between_them(redis_server, tmp_path, conc, rpm, expected):
    limits = token_limits(conc=conc, rpm=rpm)
    start_at = time.time() + 3.0  # both bursts at the same moment
    workers = [worker(redis_server, tmp_path, "burst", limits, 40, 30.0, start_at) for _ in range(2)]
    try:
        results = [printed(w) for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert sum(r["admitted"] for r in results) == expected
    assert sum(r["refused"] for r in results) == 80 - expected


def test_kill_9_of_a_worker_frees_its_slots_within_one_lease(
    redis_server, tmp_path, limiter_factory, inspect
):
    lease = 1.5
    limits = token_limits(conc=2)
    holder = worker(redis_server, tmp_path, "hold", limits, 2, lease)
    try:
        assert printed(holder) == {"held": 2, "leases": 2}
        probe = limiter_factory(lease=lease)
        deadline = time.monotonic() + 2 * lease  # alive, it renews: the slots stay taken
        while time.monotonic() < deadline:
            assert not probe.acquire(limits).admitted
            gevent.sleep(0.1)
        holder.signal(signal.SIGKILL)
        holder.wait(10)
        killed_at = time.monotonic()
        gwait(lambda: inspect.zcard(limits.keys[0]) == 0 or probe.acquire(limits).admitted, timeout=10)
        assert time.monotonic() - killed_at <= lease + 2.0  # one lease, plus generous slack
    finally:
        holder.stop()


def test_keys_never_hold_the_token_and_expire_when_idle(limiter_factory, inspect):
    limiter = limiter_factory(lease=2.0)
    limits = effective_limits(TOKEN, None, 1, 3, 0, 0)
    admission = limiter.acquire(limits)
    assert admission.admitted
    keys = [key.decode() for key in inspect.keys("*")]
    assert sorted(keys) == sorted(limits.keys)
    assert all(TOKEN not in key for key in keys)
    assert 0 < inspect.pttl(limits.keys[0]) <= 2000
    assert 0 < inspect.pttl(limits.keys[1]) <= 60_000
    limiter.release(admission)
    gwait(lambda: inspect.zcard(limits.keys[0]) == 0, timeout=5)
    assert limits_module.KEY_PREFIX == "llmproxy:"
    assert tokentable.MAX_LIMIT == 1_000_000_000


def test_a_redis_that_lost_the_script_gets_it_again_without_an_outage(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(rpm=2)
    assert limiter.acquire(limits).admitted
    inspect.script_flush()
    assert inspect.script_exists(limits_module.ACQUIRE_SHA) == [False]
    assert limiter.acquire(limits).admitted
    assert not limiter.acquire(limits).admitted
    assert inspect.script_exists(limits_module.ACQUIRE_SHA) == [True]
    assert limiter.outages_total == 0


def test_an_admission_dropped_without_release_is_not_renewed_for_ever(limiter_factory, inspect):
    limiter = limiter_factory()
    limits = token_limits(conc=1)
    admission = limiter.acquire(limits)
    assert admission.admitted
    del admission  # never released: a bug on the request path must not lock the token out
    gc.collect()
    assert limiter.in_flight_leases == 0
    assert limiter.dropped_total == 1
    gwait(lambda: inspect.zcard(limits.keys[0]) == 0, timeout=5, what="the dropped lease's release")
    kept = limiter.acquire(limits)
    assert kept.admitted
    limiter.release(kept)
    del kept
    gc.collect()
    assert limiter.dropped_total == 1  # a released admission is not released twice


def test_429_is_a_rate_limit_error_in_the_openai_shape():
    body = json.loads(error_body(429, "token_rate_limit", "slow down", "req-1"))
    assert body == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "code": "token_rate_limit",
            "request_id": "req-1",
        }
    }


def test_settings_and_limiter_from_the_config():
    config = ProxyConfig.from_env(
        {"TOKEN_RPM": "7", "LIMITS_REDIS_URL": "unix:///tmp/x.sock", "LIMITS_LEASE_SECONDS": "9"}
    )
    assert LimitSettings.from_config(config) == LimitSettings(0, 7, True)
    assert LimitSettings.from_config(ProxyConfig.from_env({})) == LimitSettings(0, 0, False)
    limiter = Limiter.from_config(config)
    assert (limiter.enabled, limiter.lease_seconds, limiter.lease_ms, limiter.renew_every) == (
        True, 9.0, "9000", 3.0,
    )  # fmt: skip
    assert Limiter.from_config(ProxyConfig.from_env({})).enabled is False


def test_a_new_table_version_reuses_the_limits_of_unchanged_tokens(tmp_path):
    path = tmp_path / "tokens.json"
    settings = LimitSettings(default_concurrency=2, default_rpm=0, enforced=True)
    write_table(path, {TOKEN: row("http://u/v1", token_id=7), "sk-b": row("http://u/v1", token_id=8)})
    store = TableStore(str(path), 0.1, settings)
    assert store.check() is True
    first = store.current.routes
    write_table(
        path,
        {
            TOKEN: row("http://u/v1", token_id=7),  # unchanged
            "sk-b": row("http://u/v1", token_id=8, token_rpm=5),  # a new override
            "sk-c": row("http://u/v1", token_id=9),  # new
        },
    )
    assert store.check() is True
    second = store.current.routes
    assert second[TOKEN].limits is first[TOKEN].limits
    assert second["sk-b"].limits == TokenLimits.build(2, 5, "i8")
    assert second["sk-c"].limits == TokenLimits.build(2, 0, "i9")
    write_table(path, {TOKEN: row("http://u/v1", token_id=70)})  # another id: other keys
    assert store.check() is True
    assert store.current.routes[TOKEN].limits.keys[0] == "llmproxy:{i70}:conc"


def test_an_unreachable_redis_at_start_can_also_mean_starting_unlimited(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="proxy.limits")
    redis_server.stop()
    limiter = Limiter(redis_server.url)
    try:
        assert limiter.check_reachable(wait=0.3, fail=False) is False
        assert limiter.down_since is not None
        limits = token_limits(rpm=1)
        assert limiter.acquire(limits).admitted and limiter.acquire(limits).admitted
        assert len(limit_events(caplog, "limits_redis_down")) == 1
        limiter.start()
        redis_server.start()
        gwait(lambda: limiter.down_since is None, timeout=10, what="Redis to be seen again")
        assert limiter.acquire(limits).admitted
        assert not limiter.acquire(limits).admitted
    finally:
        limiter.close(timeout=1)


def test_close_with_redis_down_returns_and_the_leases_expire_on_their_own(redis_server):
    limiter = Limiter(redis_server.url, 1.0)
    limiter.check_reachable(5)
    limiter.start()
    limits = token_limits(conc=1)
    held = limiter.acquire(limits)
    assert held.admitted
    redis_server.stop()
    started = time.monotonic()
    limiter.close(timeout=1)  # does not raise, does not hang
    assert time.monotonic() - started < 5
    assert held.admitted  # (kept alive until here: the safety net must not be what releases it)
