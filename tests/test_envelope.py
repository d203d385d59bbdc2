"""The signed envelope: a signature verifies, and changing any byte of any part makes it fail."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.protocol.envelope import (
    KEY_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    EnvelopeError,
    check_fresh,
    sign_request,
    signed_bytes,
    verify_request,
)
from peer.protocol.identity import Identity

ALICE = Identity.generate()
METHOD, PATH, BODY = "POST", "/v1/offers?x=1", b'{"price_per_hour": "1.20"}'


def _flip(text: str, index: int) -> str:
    """Change one byte (character) of ``text`` to another printable one."""
    replacement = "0" if text[index] != "0" else "1"
    return text[:index] + replacement + text[index + 1 :]


def _assert_rejected(headers, method=METHOD, path=PATH, body=BODY) -> None:
    with pytest.raises(EnvelopeError):
        verify_request(headers, method, path, body)


def test_roundtrip_verifies_and_reports_the_signer() -> None:
    headers = sign_request(ALICE, METHOD, PATH, BODY, timestamp=1_700_000_000, nonce="ab" * 16)
    envelope = verify_request(headers, METHOD, PATH, BODY)
    assert envelope.account == ALICE.account
    assert envelope.timestamp == 1_700_000_000
    assert envelope.nonce == "ab" * 16


def test_signed_bytes_are_the_documented_layout() -> None:
    # A client in another language builds exactly this string (the last line is sha256(b"body")).
    assert signed_bytes("POST", "/v1/offers?x=1", "17", "abcd", b"body") == (
        b"POST\n/v1/offers?x=1\n17\nabcd\n230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5"
    )


@pytest.mark.parametrize("part", ["method", "path", "body"])
def test_every_byte_of_the_request_is_covered(part: str) -> None:
    headers = sign_request(ALICE, METHOD, PATH, BODY)
    parts = {"method": METHOD, "path": PATH, "body": BODY.decode()}
    for i in range(len(parts[part])):
        changed = dict(parts, **{part: _flip(parts[part], i)})
        _assert_rejected(headers, changed["method"], changed["path"], changed["body"].encode())


@pytest.mark.parametrize("header", [KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER])
def test_every_byte_of_every_header_is_covered(header: str) -> None:
    headers = sign_request(ALICE, METHOD, PATH, BODY)
    for i in range(len(headers[header])):
        _assert_rejected({**headers, header: _flip(headers[header], i)})


def test_another_key_cannot_sign_for_an_account() -> None:
    mallory = Identity.generate()
    headers = sign_request(mallory, METHOD, PATH, BODY)
    with pytest.raises(EnvelopeError) as e:
        verify_request({**headers, KEY_HEADER: ALICE.account}, METHOD, PATH, BODY)
    assert e.value.field == SIGNATURE_HEADER


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        (KEY_HEADER, "xyz", "64 lowercase hex"),
        (TIMESTAMP_HEADER, "-5", "unix seconds"),
        (NONCE_HEADER, "ab" * 8 + "a", "lowercase hex"),
        (NONCE_HEADER, "ab" * 15, "lowercase hex"),
        (SIGNATURE_HEADER, "zz", "lowercase hex"),
    ],
)
def test_malformed_headers_name_the_header(header: str, value: str, reason: str) -> None:
    headers = sign_request(ALICE, METHOD, PATH, BODY)
    with pytest.raises(EnvelopeError) as e:
        verify_request({**headers, header: value}, METHOD, PATH, BODY)
    assert e.value.field == header
    assert reason in str(e.value)


def test_missing_header_is_named() -> None:
    headers = sign_request(ALICE, METHOD, PATH, BODY)
    del headers[NONCE_HEADER]
    with pytest.raises(EnvelopeError, match="X-Hivemarket-Nonce: header is missing"):
        verify_request(headers, METHOD, PATH, BODY)


def test_freshness_window() -> None:
    envelope = verify_request(sign_request(ALICE, METHOD, PATH, BODY, timestamp=1000), METHOD, PATH, BODY)
    check_fresh(envelope, now=1000 + 29, window=30)
    with pytest.raises(EnvelopeError, match=r"\+?-31 s from the server's clock"):
        check_fresh(envelope, now=1031, window=30)


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=40),
    body=st.binary(max_size=200),
    data=st.data(),
)
def test_any_single_change_fails(method: str, path: str, body: bytes, data: st.DataObject) -> None:
    headers = sign_request(ALICE, method, path, body)
    verify_request(headers, method, path, body)
    part = data.draw(st.sampled_from(["path", "body", *headers]))
    if part == "body":
        i = data.draw(st.integers(0, len(body)))  # == len(body) appends a byte
        changed = body[:i] + bytes([(body[i] + 1) % 256 if i < len(body) else 0]) + body[i + 1 :]
        _assert_rejected(headers, method, path, changed)
    elif part == "path":
        i = data.draw(st.integers(0, len(path) - 1))
        _assert_rejected(headers, method, _flip(path, i), body)
    else:
        i = data.draw(st.integers(0, len(headers[part]) - 1))
        _assert_rejected({**headers, part: _flip(headers[part], i)}, method, path, body)
