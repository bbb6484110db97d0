"""Per-token limits end to end (issue 14): the real launcher (scripts/run), the real supervisord
with two workers sharing the port (SO_REUSEPORT), the local redis-server it starts, the deployed
syncer reading the fake backend, and the session's fake upstream as the model API.

Two deployments, one per class (each torn down when its class is done):

- ``TestDefaults``: TOKEN_MAX_CONCURRENCY=2 and TOKEN_RPM=5 with a short lease
  (LIMITS_LEASE_SECONDS=3); each token's row turns one of the two off (``0`` = unlimited for that
  token), so one token is limited by concurrency only, one by the minute only, one by neither.
- ``TestRowsOnly``: no default (PROXY_LOCAL_REDIS=true): one row carries
  ``token_max_concurrency: 1``, another row carries nothing; then the Redis program is stopped
  and started again.

Slots are held by long streams on raw sockets (``Held``); a stream ends when its client leaves.
Which worker serves a connection is read from /proc (the worker that holds the accepted socket);
only processes these tests started are signalled, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from common import tokentable
from tests.support.metrics import scrape, total
from tests.support.procs import wait_for
from tests.support.rawhttp import RawClient, new_id
from tests.support.sse import BODY as STREAM_BODY
from tests.support.tables import register_secret
from tests.test_deploy import PROGRAMS, Deployment, FakeBackend, backend_row, cmdline, pid_alive

pytestmark = pytest.mark.deploy

PATH = "/chat/completions"
LONG_STREAM = "sse;events=1200;interval=0.05"  # a minute: always ended by its client here
LEASE = 3  # LIMITS_LEASE_SECONDS of the first deployment
RATELIMIT = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")

CONC_TOKEN = register_secret("sk-e2e-conc-canary-3c5e7a9b1d2f4a6c8e0b")  # concurrency 2 (default)
RPM_TOKEN = register_secret("sk-e2e-rpm-canary-9a8b7c6d5e4f3a2b1c0d")  # rpm 5 (default)
ONE_TOKEN = register_secret("sk-e2e-one-canary-1f2e3d4c5b6a79880a1b")  # its row: concurrency 1
FREE_TOKEN = register_secret("sk-e2e-free-canary-5d4c3b2a1f0e9d8c7b6a")  # its row: 0 and 0
PLAIN_TOKEN = register_secret("sk-e2e-plain-canary-7e6d5c4b3a2f1e0d9c8b")  # a row without the fields
IDS = {CONC_TOKEN: 21, RPM_TOKEN: 22, ONE_TOKEN: 23, FREE_TOKEN: 24, PLAIN_TOKEN: 25}


# ---------------------------------------------------------------------------- clients


class Answer:
    """One whole response read strictly by its framing."""

    def __init__(self, request_id: str, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.request_id = request_id
        self.status = status
        self.headers = headers
        self.body = body

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, (name, self.headers)
        return values[0] if values else None

    def ratelimit(self) -> tuple[str | None, str | None]:
        return self.header(RATELIMIT[0]), self.header(RATELIMIT[1])


def headers_for(token: str, request_id: str, fake: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "X-Request-ID": request_id,
        "X-Fake": fake,
        "Content-Type": "application/json",
    }


def once(port: int, token: str, fake: str = "json;size=200") -> Answer:
    """One request on a new connection (Connection: close)."""
    request_id = new_id("e2e")
    with RawClient(port, timeout=15) as client:
        headers = {**headers_for(token, request_id, fake), "Connection": "close"}
        client.send_request("POST", PATH, headers, b'{"model": "m-e2e"}')
        status, header_list, body = client.read_response("POST")
    return Answer(request_id, status, header_list, body)


class Held:
    """A long stream held open on its own connection; ``close()`` = the client leaves. A refused
    request (not 200) is read whole and its connection closed at once."""

    def __init__(self, port: int, token: str, fake: str = LONG_STREAM) -> None:
        self.request_id = new_id("held")
        self.client = RawClient(port, timeout=15)
        self.client_port = self.client.sock.getsockname()[1]
        self.client.send_request("POST", PATH, headers_for(token, self.request_id, fake), STREAM_BODY)
        status, _ = self.client.read_head()
        self.status = status
        self.headers = list(self.client.header_list)
        if status == 200:
            body = b""
            pieces = self.client.iter_body("POST")
            while b"data:" not in body:  # the stream really runs: its first event came through
                body += next(pieces)[1]
            self.body = body
        else:
            self.body = self.client.read_body("POST")
            self.client.close()

    @property
    def answer(self) -> Answer:
        return Answer(self.request_id, self.status, self.headers, self.body)

    def close(self) -> None:
        self.client.close()


class Streams:
    """Every Held of a test, closed when the test ends however it ends."""

    def __init__(self) -> None:
        self.held: list[Held] = []

    def open(self, port: int, token: str) -> Held:
        held = Held(port, token)
        self.held.append(held)
        return held

    def close_all(self) -> None:
        for held in self.held:
            held.close()


@pytest.fixture
def streams():
    opened = Streams()
    yield opened
    opened.close_all()


def admitted_within(port: int, token: str, streams: Streams, timeout: float) -> Held:
    """A stream of ``token`` admitted within ``timeout`` (tries again after each 429)."""
    refused: list[Held] = []

    def attempt():
        held = streams.open(port, token)
        if held.status == 200:
            return held
        assert held.status == 429, held.body
        refused.append(held)
        return None

    return wait_for(attempt, timeout=timeout, interval=0.1, what=f"an admission ({len(refused)} refused)")


# ---------------------------------------------------------------------------- assertions


def assert_refused(answer: Answer, code: str, limit: str) -> dict:
    """The 429 of the contract; returns its error object."""
    assert answer.status == 429, (answer.status, answer.body[:300])
    error = json.loads(answer.body)["error"]
    assert set(error) == {"message", "type", "code", "request_id"}, error
    assert error["type"] == "rate_limit_error"
    assert error["code"] == code
    assert error["request_id"] == answer.request_id
    assert isinstance(error["message"], str) and error["message"]
    assert answer.header("x-request-id") == answer.request_id
    retry_after = answer.header("retry-after")
    assert retry_after is not None and retry_after.isdigit(), answer.headers  # whole seconds
    assert answer.ratelimit()[0] == limit
    assert answer.ratelimit()[1] == "0"
    return error


def assert_access_refused(line: dict, limit: str) -> None:
    assert line["logger"] == "proxy.access"
    assert line["status"] == 429
    assert line["end_reason"] == "rate_limited"
    assert line["limit"] == limit


def assert_concurrency_refused(dep, answers: list[Answer], logged: list[Answer], limit: str) -> dict:
    """``answers`` are concurrency 429s saying Retry-After: 1; the access lines of ``logged`` all
    say so (returned by request id)."""
    for answer in answers:
        assert_refused(answer, "token_concurrency_limit", limit)
        assert answer.header("retry-after") == "1"
    lines = dep.access_by_id([a.request_id for a in logged])
    for line in lines.values():
        assert_access_refused(line, "concurrency")
    return lines


def nothing_upstream(upstream, request_ids) -> None:
    wanted = set(request_ids)
    seen = [
        value
        for record in upstream.requests()
        for name, value in record["headers"]
        if name.lower() == "x-request-id" and value in wanted
    ]
    assert seen == [], f"refused requests reached the upstream: {seen}"


def rate_limited(dep: Deployment, limit: str) -> float:
    return total(scrape(dep.url), "rate_limited_total", limit=limit)


def wait_metric(dep: Deployment, name: str, expected: float, **labels: str) -> None:
    """The deployment-wide sample reaches ``expected`` (workers write their files as they count,
    the limiter's counters once a second) and never passes it."""

    def reached() -> bool:
        value = total(scrape(dep.url), name, **labels)
        assert value <= expected, (name, labels, value, expected)
        return value == expected

    wait_for(reached, timeout=10, interval=0.1, what=f"{name}{labels} == {expected}")


# ---------------------------------------------------------------------------- processes


def worker_pids(dep: Deployment) -> dict[int, str]:
    states = dep.status()
    pids = {pid: name for name, (state, pid) in states.items() if name.startswith("proxy:") and pid}
    assert len(pids) == 2, states
    return pids


def worker_of(dep: Deployment, held: Held, pids) -> int:
    """The worker holding the accepted end of ``held``'s connection (read from /proc)."""

    def inode() -> str | None:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == dep.port and int(remote.split(":")[1], 16) == held.client_port:
                return fields[9]
        return None

    wanted = f"socket:[{wait_for(inode, timeout=5, what='the server end of the connection')}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{fd}") == wanted:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker of {sorted(pids)} holds {wanted}")


def live_leases(dep: Deployment) -> dict[str, int]:
    """Concurrency leases not yet expired, by key, read from the deployment's Redis."""
    client = redis.Redis(unix_socket_path=str(dep.run_dir / "redis.sock"), socket_timeout=5)
    try:
        seconds, micros = client.time()
        now = seconds * 1000 + micros // 1000
        keys = list(client.scan_iter("llmproxy:*:conc"))
        counts = {key.decode(): client.zcount(key, f"({now}", "+inf") for key in keys}
    finally:
        client.close()
    return {key: count for key, count in counts.items() if count}


def settle(dep: Deployment, streak_token: str) -> None:
    """Every program RUNNING, every worker serving the table (many new connections in a row
    succeed: SO_REUSEPORT spreads them), no lease left from an earlier test."""
    dep.start_all(["redis", *PROGRAMS])
    results: list[int] = []

    def streak() -> bool:
        results.append(once(dep.port, streak_token).status)
        return len(results) >= 12 and all(status == 200 for status in results[-12:])

    wait_for(streak, timeout=20, interval=0.02, what="every worker serves the table")
    wait_for(lambda: not live_leases(dep), timeout=LEASE + 10, interval=0.1, what="no lease left")


def start_deployment(logs_dir: Path, backend: FakeBackend, env: dict[str, str]) -> Deployment:
    deployment = Deployment(logs_dir, {"SERVER_API_URL": backend.url, "TOKEN_FILE_POLL": "0.2", **env})
    try:
        deployment.wait_running(["redis", *PROGRAMS], timeout=30)
        wait_for(deployment.ready, timeout=20, interval=0.05, what="proxy ready")
    except BaseException:
        deployment.stop()
        raise
    return deployment


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("limits-e2e")


@pytest.fixture(scope="module")
def backend(logs_dir, upstream):
    url = upstream.url + "/v1"
    fake = FakeBackend(logs_dir)
    fake.control.set(
        rows=[
            backend_row(CONC_TOKEN, IDS[CONC_TOKEN], url, token_rpm=0),
            backend_row(RPM_TOKEN, IDS[RPM_TOKEN], url, token_max_concurrency=0),
            backend_row(ONE_TOKEN, IDS[ONE_TOKEN], url, token_max_concurrency=1, token_rpm=0),
            backend_row(FREE_TOKEN, IDS[FREE_TOKEN], url, token_max_concurrency=0, token_rpm=0),
            backend_row(PLAIN_TOKEN, IDS[PLAIN_TOKEN], url),
        ]
    )
    yield fake
    fake.stop()


@pytest.fixture(scope="class")
def defaults_deployment(logs_dir, backend):
    env = {"TOKEN_MAX_CONCURRENCY": "2", "TOKEN_RPM": "5", "LIMITS_LEASE_SECONDS": str(LEASE)}
    deployment = start_deployment(logs_dir, backend, env)
    yield deployment
    deployment.stop()


@pytest.fixture(scope="class")
def rows_deployment(logs_dir, backend):
    deployment = start_deployment(logs_dir, backend, {"PROXY_LOCAL_REDIS": "true"})
    yield deployment
    deployment.stop()


# ---------------------------------------------------------------------------- defaults set


class TestDefaults:
    @pytest.fixture
    def dep(self, defaults_deployment) -> Deployment:
        settle(defaults_deployment, FREE_TOKEN)
        return defaults_deployment

    def test_two_streams_hold_both_slots_whichever_worker_and_one_ending_frees_one(
        self, dep, upstream, streams
    ):
        before = rate_limited(dep, "concurrency")
        first = streams.open(dep.port, CONC_TOKEN)
        second = streams.open(dep.port, CONC_TOKEN)
        assert (first.status, second.status) == (200, 200), (first.body, second.body)
        assert first.answer.ratelimit() == ("2", "1")
        assert second.answer.ratelimit() == ("2", "0")

        # New connections in a row, all refused, whichever worker accepts them (both do: the
        # access lines carry the pid; more connections, bounded, if one worker took the first 20).
        refused: list[Answer] = []
        pids = set(worker_pids(dep))
        answered_by: set[int] = set()
        while len(refused) < 20 or (answered_by != pids and len(refused) < 80):
            batch = [once(dep.port, CONC_TOKEN) for _ in range(20 if not refused else 5)]
            refused += batch
            lines = assert_concurrency_refused(dep, batch, refused, "2")
            answered_by = {line["pid"] for line in lines.values()}
        assert answered_by == pids, (answered_by, pids)
        nothing_upstream(upstream, [a.request_id for a in refused])
        wait_metric(dep, "rate_limited_total", before + len(refused), limit="concurrency")

        # One stream ends (its client leaves; its slot is given back to Redis): the very next
        # request is admitted, and it takes the freed slot (the one after it is refused).
        first.close()
        line = dep.access_by_id([first.request_id])[first.request_id]
        assert (line["status"], line["end_reason"], line["limit"]) == (200, "client_gone", None)
        conc_key = f"llmproxy:{{i{IDS[CONC_TOKEN]}}}:conc"
        wait_for(lambda: live_leases(dep) == {conc_key: 1}, timeout=5, what="the slot given back")
        third = streams.open(dep.port, CONC_TOKEN)
        assert third.status == 200, third.body
        assert third.answer.ratelimit() == ("2", "0")
        assert upstream.records_of(third.request_id) != []
        assert_refused(once(dep.port, CONC_TOKEN), "token_concurrency_limit", "2")

    def test_rpm_admits_exactly_5_of_8_then_429_with_retry_after(self, dep, upstream):
        before = rate_limited(dep, "rpm")
        # The upstream's own figures of the same names (about its key) never reach the client.
        fake = (
            "json;size=200;header=x-ratelimit-limit-requests:10000;header=x-ratelimit-remaining-requests:9999"
        )
        answers = [once(dep.port, RPM_TOKEN, fake) for _ in range(8)]
        assert [a.status for a in answers] == [200] * 5 + [429] * 3, [a.body[:200] for a in answers]
        assert [a.ratelimit() for a in answers[:5]] == [("5", str(left)) for left in (4, 3, 2, 1, 0)]
        for answer in answers[5:]:
            assert_refused(answer, "token_rate_limit", "5")
            assert 1 <= int(answer.header("retry-after")) <= 60
        lines = dep.access_by_id([a.request_id for a in answers])
        for answer in answers[:5]:
            line = lines[answer.request_id]
            assert (line["status"], line["end_reason"], line["limit"]) == (200, "complete", None)
            assert upstream.records_of(answer.request_id) != []
        for answer in answers[5:]:
            assert_access_refused(lines[answer.request_id], "rpm")
        nothing_upstream(upstream, [a.request_id for a in answers[5:]])
        wait_metric(dep, "rate_limited_total", before + 3, limit="rpm")

    def test_a_token_whose_row_says_0_is_unlimited_and_carries_no_ratelimit_headers(self, dep, streams):
        held = [streams.open(dep.port, FREE_TOKEN) for _ in range(3)]  # over both defaults' 2...
        answers = [once(dep.port, FREE_TOKEN) for _ in range(6)]  # ... and the 5 a minute
        assert [h.status for h in held] + [a.status for a in answers] == [200] * 9
        for answer in [h.answer for h in held] + answers:
            assert answer.ratelimit() == (None, None), answer.headers

    def test_kill_9_of_a_worker_holding_two_slots_frees_them_within_one_lease(self, dep, streams):
        pids = worker_pids(dep)
        first = streams.open(dep.port, CONC_TOKEN)
        assert first.status == 200, first.body
        victim = worker_of(dep, first, pids)
        # The second stream on the same worker: a stream another worker took is closed (its slot
        # given back) and the next one tried, a bounded number of times.
        second = None
        for _ in range(30):
            candidate = admitted_within(dep.port, CONC_TOKEN, streams, timeout=10)
            if worker_of(dep, candidate, pids) == victim:
                second = candidate
                break
            candidate.close()
            dep.access_by_id([candidate.request_id])
        assert second is not None, "SO_REUSEPORT never gave the same worker a second connection"
        assert_refused(once(dep.port, CONC_TOKEN), "token_concurrency_limit", "2")  # both slots held

        assert "wsgi.py" in cmdline(victim)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: not pid_alive(victim), timeout=5, what="the killed worker gone")
        first.close()
        second.close()

        # Nothing released them: they are free once their lease runs out (plus slack for a loaded
        # machine), and then two streams are admitted at once; the limit still holds after that.
        a = admitted_within(dep.port, CONC_TOKEN, streams, timeout=LEASE + 10)
        b = admitted_within(dep.port, CONC_TOKEN, streams, timeout=5)
        assert time.monotonic() - killed_at < LEASE + 15
        # (The two dead leases may lapse a moment apart: each expires one lease after its last
        # renewal or its admission.)
        assert a.answer.ratelimit() in (("2", "1"), ("2", "0"))
        assert b.answer.ratelimit() == ("2", "0")
        assert_refused(once(dep.port, CONC_TOKEN), "token_concurrency_limit", "2")
        # supervisord brought the worker back.
        dep.wait_running(PROGRAMS, timeout=20)
        assert victim not in worker_pids(dep)


# ---------------------------------------------------------------------------- limits only in rows


class TestRowsOnly:
    @pytest.fixture
    def dep(self, rows_deployment) -> Deployment:
        settle(rows_deployment, PLAIN_TOKEN)
        return rows_deployment

    def test_the_syncer_carries_the_row_limit_into_the_file(self, dep):
        table, _ = tokentable.read(str(dep.token_file))
        limits = {token: (row.token_max_concurrency, row.token_rpm) for token, row in table.tokens.items()}
        assert limits == {
            CONC_TOKEN: (None, 0),
            RPM_TOKEN: (0, None),
            ONE_TOKEN: (1, 0),
            FREE_TOKEN: (0, 0),
            PLAIN_TOKEN: (None, None),
        }
        document = json.loads(dep.token_file.read_bytes())
        assert document["format"] == 1
        assert document["tokens"][ONE_TOKEN]["token_max_concurrency"] == 1
        assert document["tokens"][ONE_TOKEN]["token_rpm"] == 0
        # A row without them is written without them (and served: the fixture's requests).
        assert "token_max_concurrency" not in document["tokens"][PLAIN_TOKEN]
        assert "token_rpm" not in document["tokens"][PLAIN_TOKEN]

    def test_a_row_with_token_max_concurrency_1_is_limited_to_1_another_token_is_not(
        self, dep, upstream, streams
    ):
        before = rate_limited(dep, "concurrency")
        one = streams.open(dep.port, ONE_TOKEN)
        assert one.status == 200, one.body
        assert one.answer.ratelimit() == ("1", "0")
        refused = [once(dep.port, ONE_TOKEN) for _ in range(4)]
        assert_concurrency_refused(dep, refused, refused, "1")
        nothing_upstream(upstream, [a.request_id for a in refused])
        wait_metric(dep, "rate_limited_total", before + 4, limit="concurrency")

        # The token whose row says nothing (and no default is set): never limited, no headers.
        plain = [streams.open(dep.port, PLAIN_TOKEN) for _ in range(3)]
        answers = [h.answer for h in plain] + [once(dep.port, PLAIN_TOKEN) for _ in range(4)]
        assert [a.status for a in answers] == [200] * 7
        assert all(a.ratelimit() == (None, None) for a in answers), [a.headers for a in answers]

    def test_redis_stopped_requests_are_served_one_error_line_then_enforced_again(self, dep, streams):
        pids = set(worker_pids(dep))
        # Traffic as any deployment sees it before the outage: concurrent requests of the limited
        # token (each worker then has several connections to Redis open).
        with ThreadPoolExecutor(16) as pool:
            burst = list(pool.map(lambda _: once(dep.port, ONE_TOKEN), range(48)))
        assert {a.status for a in burst} <= {200, 429} and 200 in {a.status for a in burst}
        mark = len(dep.records())
        outages = total(scrape(dep.url), "limiter_outages_total")
        unenforced = total(scrape(dep.url), "limiter_unenforced_total")
        result = dep.ctl("stop", "redis")
        try:
            assert result.returncode == 0, result.stdout + result.stderr
            assert dep.status()["redis"][0] == "STOPPED"

            # Served, unlimited: two streams of the token limited to 1, and requests on new
            # connections (both workers see the outage), none with the x-ratelimit headers.
            held = [streams.open(dep.port, ONE_TOKEN) for _ in range(2)]
            answers = [once(dep.port, ONE_TOKEN) for _ in range(12)]
            served = [h.answer for h in held] + answers
            assert [a.status for a in served] == [200] * len(served), [a.body[:200] for a in served]
            assert all(a.ratelimit() == (None, None) for a in served), [a.headers for a in served]
            lines = dep.access_by_id([a.request_id for a in answers])
            saw_outage = {line["pid"] for line in lines.values()}
            for held_stream in held:
                held_stream.close()
            dep.access_by_id([h.request_id for h in held])

            # One error line per worker that saw the outage, not one per request.
            down = [r for r in dep.records()[mark:] if r.get("event") == "limits_redis_down"]
            assert all(r["level"] == "ERROR" for r in down), down
            per_worker = {pid: sum(1 for r in down if r["pid"] == pid) for pid in pids}
            assert {pid for pid, count in per_worker.items() if count} >= saw_outage
            assert set(per_worker.values()) <= {0, 1}, per_worker
            assert {r["pid"] for r in down} <= pids
            wait_metric(dep, "limiter_outages_total", outages + len(down))
            wait_metric(dep, "limiter_unenforced_total", unenforced + len(served))
        finally:
            started = dep.ctl("start", "redis")
        assert started.returncode == 0, started.stdout + started.stderr

        # Back: each worker that saw the outage logs limits_redis_up (it probes once a second),
        # and the limit is enforced again.
        def came_back() -> bool:
            up = [r for r in dep.records()[mark:] if r.get("event") == "limits_redis_up"]
            return {r["pid"] for r in up} >= {r["pid"] for r in down}

        wait_for(came_back, timeout=20, interval=0.1, what="limits_redis_up of each worker")
        up = [r for r in dep.records()[mark:] if r.get("event") == "limits_redis_up"]
        assert len(up) == len(down), (up, down)
        assert all(r["level"] == "INFO" for r in up), up
        # Enforced again on every worker, from the first request on (new connections, both
        # workers), and no new outage is seen: Redis is up.
        one = streams.open(dep.port, ONE_TOKEN)
        after = [once(dep.port, ONE_TOKEN) for _ in range(12)]
        outcome = [(a.status, a.ratelimit()) for a in [one.answer, *after]]
        events = [
            (r["pid"], r["event"], r["time"], r.get("error"))
            for r in dep.records()[mark:]
            if r.get("event") in ("limits_redis_down", "limits_redis_up")
        ]
        assert outcome == [(200, ("1", "0"))] + [(429, ("1", "0"))] * len(after), (outcome, events)
        for answer in after:
            assert_refused(answer, "token_concurrency_limit", "1")
        again = [r for r in dep.records()[mark:] if r.get("event") == "limits_redis_down"]
        assert again == down, events
