"""A first end-to-end check: a request goes through the proxy to the fake upstream and back."""

import requests

from tests.support.tables import UPSTREAM_KEY


def test_request_is_routed_with_the_upstream_key(proxy, upstream, auth):
    response = requests.post(
        proxy.url + "/chat/completions", json={"model": "x"}, headers={**auth, "X-Fake": "echo"}, timeout=10
    )
    assert response.status_code == 200
    received = response.json()
    assert received["target"] == "/v1/chat/completions"
    headers = {name.lower(): value for name, value in received["headers"]}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert response.headers["X-Request-ID"]
