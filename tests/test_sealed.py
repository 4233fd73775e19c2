"""Sealed values: what replicas store in Redis opens only for the set and key it was for."""

from __future__ import annotations

import pytest

from proxy.sealed import VERSION, Sealer, Unsealable

KEY = "bol-proxy:{cc:0123abcd}:token"
SECRET = "client-secret-0123456789"
VALUE = b"access-token-value-0123456789"


def test_a_sealed_value_opens_to_what_was_sealed() -> None:
    sealer = Sealer(SECRET)
    stored = sealer.seal(KEY, VALUE)
    assert sealer.open(KEY, stored) == VALUE
    assert Sealer(SECRET).open(KEY, stored) == VALUE  # another replica, same secret


def test_a_sealed_value_holds_no_plaintext_and_differs_every_time() -> None:
    sealer = Sealer(SECRET)
    first, second = sealer.seal(KEY, VALUE), sealer.seal(KEY, VALUE)
    assert first != second  # a random nonce per value
    for stored in (first, second):
        assert VALUE not in stored and SECRET.encode() not in stored
        assert stored[0] == VERSION


def test_a_value_sealed_with_another_client_secret_does_not_open() -> None:
    stored = Sealer("another-secret").seal(KEY, VALUE)
    with pytest.raises(Unsealable):
        Sealer(SECRET).open(KEY, stored)


def test_a_value_copied_to_another_key_does_not_open() -> None:
    sealer = Sealer(SECRET)
    stored = sealer.seal(KEY, VALUE)
    with pytest.raises(Unsealable):
        sealer.open(KEY.replace("token", "other"), stored)


def test_a_value_sealed_for_another_purpose_does_not_open() -> None:
    stored = Sealer(SECRET, purpose="rate budgets").seal(KEY, VALUE)
    with pytest.raises(Unsealable):
        Sealer(SECRET).open(KEY, stored)


@pytest.mark.parametrize("position", [0, 1, 12, 13, -1])
def test_a_tampered_value_does_not_open(position: int) -> None:
    sealer = Sealer(SECRET)
    stored = bytearray(sealer.seal(KEY, VALUE))
    stored[position] ^= 0x01
    with pytest.raises(Unsealable):
        sealer.open(KEY, bytes(stored))


@pytest.mark.parametrize("stored", [b"", b"\x01", b"plain-old-format-token", bytes(40)])
def test_a_short_or_foreign_value_does_not_open(stored: bytes) -> None:
    with pytest.raises(Unsealable):
        Sealer(SECRET).open(KEY, stored)


def test_the_sealer_never_shows_its_secret() -> None:
    sealer = Sealer(SECRET)
    assert SECRET not in repr(sealer) and SECRET not in str(sealer)
