"""Masking of credentials (common.jsonlog): unit tests, no socket involved."""

from hypothesis import given, settings
from hypothesis import strategies as st

from common.jsonlog import (
    _KEY_SHAPED,
    SECRET_HEADERS,
    _mask_match,
    mask_header_value,
    mask_key_shaped,
    mask_secret,
    mask_text,
)
from proxyapp.logs import headers_for_log

FRAGMENTS = [
    "sk-", "SK-", "pk-", "ak-", "k-", "eyJ", "eyJhbGciOi.", "Bearer ", "bearer\t", "api_key", "apikey",
    "api-key", "access_token", "accesstoken", "auth-token", "authtoken", "token", "Token", "secret",
    "password", "passwd", "key", "monkey", "=", ":", '"', "'", '\\"', " ", "\n", ",", ";", "&", "}",
    "abcdefghij", "0123456789", "_", "-", ".", "x", "İ", "é",
]  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
def test_fast_masking_equals_the_reference_regex(text):
    # mask_key_shaped only tries the regex where a match can start; it must agree with a full scan.
    assert mask_key_shaped(text) == _KEY_SHAPED.sub(_mask_match, text)


def reference_headers_for_log(headers, secrets):
    """headers_for_log as it was: one mask call per value."""
    logged = {}
    for name, value in headers:
        lower = name.lower()
        masked = mask_header_value(lower, value) if lower in SECRET_HEADERS else mask_text(value, secrets)
        logged[name] = masked if name not in logged else logged[name] + ", " + masked
    return logged


HEADER_NAMES = ["X-A", "X-B", "WWW-Authenticate", "Authorization", "Cookie", "x-a"]
SECRET = "sk-client-0123456789abcdef"


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(HEADER_NAMES),
            st.lists(st.sampled_from([*FRAGMENTS, "\x00", "&", "&\x00", SECRET]), max_size=8).map("".join),
        ),
        max_size=8,
    )
)
def test_header_values_masked_together_equal_each_masked_alone(headers):
    # headers_for_log masks all the values in one call; a value must come out exactly as it
    # would alone (no match may run from one value into the next: "WWW-Authenticate: Bearer").
    assert headers_for_log(headers, (SECRET,)) == reference_headers_for_log(headers, (SECRET,))


def test_a_bare_bearer_scheme_does_not_mask_the_next_header():
    headers = [("WWW-Authenticate", "Bearer"), ("Content-Type", "application/json")]
    assert headers_for_log(headers, ())["Content-Type"] == "application/json"


def test_key_shaped_values_are_masked():
    text = '{"api_key": "abcdefgh12", "k": "sk-0123456789abcdefghij", "auth": "Bearer qwertyuiop"}'
    masked = mask_key_shaped(text)
    assert "abcdefgh12" not in masked
    assert "sk-0123456789abcdefghij" not in masked
    assert "qwertyuiop" not in masked
    assert "sk-01…ghij" in masked


def test_ordinary_text_is_left_alone():
    text = '{"usage": {"prompt_tokens": 11, "completion_tokens": 22}, "monkey": "banana"}'
    assert mask_key_shaped(text) == text


def test_known_secrets_are_masked_whatever_their_shape():
    secret = "zp.not-key-shaped.4e5f6a7b8c9d"
    assert secret not in mask_text(f"path/{secret}/x", [secret])


def test_mask_secret_shows_little():
    assert mask_secret("sk-6d1234567890abcdefe935") == "sk-6d…e935"
    assert mask_secret("short") == "…"
    assert mask_header_value("authorization", "Bearer sk-6d1234567890abcdefe935") == "Bearer sk-6d…e935"
