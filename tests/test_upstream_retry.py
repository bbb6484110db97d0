"""The single retry on a stale keep-alive connection (proxyapp.upstream.RetryStaleConnectionOnce).

urllib3 calls Retry.increment with the error it met; no socket is needed to check the policy:
retry once when the connection died before any response byte, never anything else (a blanket
POST retry could start a second generation)."""

import http.client

import pytest
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError

from proxyapp.upstream import RetryStaleConnectionOnce


def fresh():
    return RetryStaleConnectionOnce(total=1, connect=0, read=1, status=0, redirect=0, other=0)


@pytest.mark.parametrize(
    "cause",
    [
        http.client.RemoteDisconnected("Remote end closed connection without response"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
    ],
)
def test_a_stale_connection_is_retried_once_then_not_again(cause):
    error = ProtocolError("Connection aborted.", cause)
    once = fresh().increment("POST", "/v1/chat/completions", error=error)
    assert once.total == 0
    with pytest.raises((MaxRetryError, ProtocolError)):
        once.increment("POST", "/v1/chat/completions", error=error)


def test_a_read_timeout_is_never_retried():
    error = ReadTimeoutError(None, "/v1/chat/completions", "Read timed out.")
    with pytest.raises(ReadTimeoutError):
        fresh().increment("POST", "/v1/chat/completions", error=error)


def test_a_bad_status_line_is_never_retried():
    error = ProtocolError("Connection aborted.", http.client.BadStatusLine("garbage"))
    with pytest.raises((MaxRetryError, ProtocolError)):
        fresh().increment("POST", "/v1/chat/completions", error=error)


def test_nothing_is_retried_once_a_response_exists():
    error = ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    with pytest.raises((MaxRetryError, ProtocolError)):
        fresh().increment("POST", "/x", response=object(), error=error)


def test_the_idle_connection_check_works_above_fd_1023():
    # A busy worker holds thousands of sockets; select() fails above 1023, poll() does not.
    import os
    import resource
    import socket

    from proxyapp.upstream import _idle_socket_is_usable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    left, right = socket.socketpair()
    high = os.dup2(left.fileno(), 2000)
    try:
        sock = socket.socket(fileno=high)
        assert _idle_socket_is_usable(sock)  # nothing to read: still usable
        right.sendall(b"x")
        assert not _idle_socket_is_usable(sock)  # stray bytes: drop it
        sock.detach()
    finally:
        os.close(high)
        left.close()
        right.close()
