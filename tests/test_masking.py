"""Masking of credentials (common.jsonlog): unit tests, no socket involved."""

from hypothesis import given, settings
from hypothesis import strategies as st

from common.jsonlog import (
    _KEY_SHAPED,
    _mask_match,
    mask_header_value,
    mask_key_shaped,
    mask_secret,
    mask_text,
)

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
