"""Name resolution in the worker (proxyapp.resolver.CachingResolver).

The resolver's own rules are checked in this process with gevent's real thread pool, counting
what reaches it (IP literals never do; a name once per UPSTREAM_DNS_CACHE_SECONDS); then a worker
reaches an upstream named ``localhost`` on a new connection for each request.
"""

from __future__ import annotations

import socket
import time

import gevent
import pytest

from proxyapp.resolver import CachingResolver
from tests.support.chat import new_id, post_chat
from tests.support.tables import CLIENT_TOKEN, row


class CountingPool:
    """gevent's thread pool, counting the calls handed to it."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.calls = 0

    def apply(self, func, args=None, kwds=None):
        self.calls += 1
        return self.pool.apply(func, args, kwds)


def resolver(ttl: float) -> tuple[CachingResolver, CountingPool]:
    made = CachingResolver(ttl, hub=gevent.get_hub())
    made.pool = counting = CountingPool(made.pool)
    return made, counting


ASK = (80, socket.AF_INET, socket.SOCK_STREAM, 0, 0)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.1.2.3"])
def test_ip_literals_are_answered_without_the_thread_pool(host):
    made, pool = resolver(30)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    answer = made.getaddrinfo(host, 443, family, socket.SOCK_STREAM, 0, 0)
    assert answer == socket.getaddrinfo(host, 443, family, socket.SOCK_STREAM)
    assert pool.calls == 0


def test_a_name_is_asked_once_per_ttl():
    made, pool = resolver(0.3)
    first = made.getaddrinfo("localhost", *ASK)
    assert first and all(entry[4][0] == "127.0.0.1" for entry in first)
    assert made.getaddrinfo("localhost", *ASK) == first
    assert pool.calls == 1
    assert made.getaddrinfo("localhost", 81, *ASK[1:]) != first  # another port, another question
    assert pool.calls == 2
    time.sleep(0.4)
    assert made.getaddrinfo("localhost", *ASK) == first
    assert pool.calls == 3


def test_ttl_zero_asks_every_time():
    made, pool = resolver(0)
    for _ in range(3):
        made.getaddrinfo("localhost", *ASK)
    assert pool.calls == 3


def test_a_worker_reaches_an_upstream_by_name(proxy_factory, upstream):
    # framing=close: the upstream closes after each answer, so each request opens (and resolves
    # for) a new connection.
    proxy = proxy_factory(rows={CLIENT_TOKEN: row(f"http://localhost:{upstream.port}/v1")})
    conns = set()
    for _ in range(3):
        request_id = new_id("dns")
        response = post_chat(proxy, CLIENT_TOKEN, request_id, "json;framing=close")
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "chat.completion"
        conns.update(record["conn_id"] for record in upstream.records_of(request_id))
    assert len(conns) == 3
