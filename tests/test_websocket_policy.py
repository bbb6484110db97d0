"""proxyapp.websocket's handshake policy, as pure functions (no socket involved)."""

from __future__ import annotations

import pytest

from proxyapp.websocket import (
    client_handshake_headers,
    handshake_problem,
    is_accepted,
    is_websocket_handshake,
    protocol_token,
    upstream_handshake_headers,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = [("Upgrade", "websocket"), ("Connection", "keep-alive, Upgrade"), ("Sec-WebSocket-Key", KEY)]


@pytest.mark.parametrize(
    "method, headers, expected",
    [
        ("GET", GOOD, True),
        ("GET", [("upgrade", "WebSocket"), ("connection", "upgrade")], True),
        ("POST", GOOD, False),
        ("GET", [("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings")], False),
        ("GET", [("Upgrade", "websocket")], False),
        ("GET", [("Connection", "Upgrade")], False),
    ],
)
def test_which_requests_are_websocket_handshakes(method, headers, expected):
    assert is_websocket_handshake(method, headers) is expected


def test_handshake_problems():
    version = [("Sec-WebSocket-Version", "13")]
    assert handshake_problem([*GOOD, *version], has_body=False) is None
    assert "Version: 13" in handshake_problem(GOOD, has_body=False)
    assert "one Sec-WebSocket-Key" in handshake_problem([*GOOD, *version, ("Sec-WebSocket-Key", KEY)], False)
    assert "16 bytes" in handshake_problem([("Sec-WebSocket-Key", "YQ=="), *version], False)
    assert "no body" in handshake_problem([*GOOD, *version], has_body=True)


def test_protocol_token():
    assert protocol_token("realtime, openai-insecure-api-key.sk-abc") == "sk-abc"
    assert protocol_token("realtime") is None
    assert protocol_token("openai-insecure-api-key.") is None
    assert protocol_token(None) is None


def test_the_route_key_replaces_a_key_entry_and_extensions_are_declined():
    sent = {
        "Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-client",
        "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
        "Authorization": "Bearer sk-upstream",
    }
    out = upstream_handshake_headers(
        dict(sent), ("Authorization", "Bearer sk-upstream"), key_in_protocol=True
    )
    assert out["Sec-WebSocket-Protocol"] == "realtime, openai-insecure-api-key.sk-upstream"
    assert "Authorization" not in out and "Sec-WebSocket-Extensions" not in out
    assert (out["Connection"], out["Upgrade"]) == ("Upgrade", "websocket")
    # The token came in Authorization, a key entry sits beside it: replaced too, Authorization kept.
    both = upstream_handshake_headers(
        dict(sent), ("Authorization", "Bearer sk-upstream"), key_in_protocol=False
    )
    assert both["Authorization"] == "Bearer sk-upstream"
    assert "sk-client" not in both["Sec-WebSocket-Protocol"]
    # Legacy mode without an override: the client's own credential goes through untouched.
    legacy = upstream_handshake_headers(dict(sent), None, key_in_protocol=True)
    assert legacy["Sec-WebSocket-Protocol"] == sent["Sec-WebSocket-Protocol"]


def test_the_101_for_the_client_never_echoes_the_upstream_key():
    upstream = [
        ("Sec-WebSocket-Accept", "x"),
        ("Sec-WebSocket-Protocol", "openai-insecure-api-key.sk-upstream"),
    ]
    out = client_handshake_headers(upstream, "realtime, openai-insecure-api-key.sk-client")
    assert ("Sec-WebSocket-Protocol", "openai-insecure-api-key.sk-client") in out
    assert ("Upgrade", "websocket") in out and ("Connection", "Upgrade") in out
    assert is_accepted([("Upgrade", "WebSocket")]) and not is_accepted([("Upgrade", "h2c")])
