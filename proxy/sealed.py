"""Encryption at rest for what replicas keep in Redis (pure: no I/O).

Access tokens and refresh tokens stored in Redis are sealed with AES-256-GCM under a key
that only holders of the set's client secret can derive, so a dump or a copy of Redis
alone holds no usable token:

    key    = HKDF-SHA256(client secret, salt = fixed per product,
                         info = purpose + the Redis key the value is stored under)
    stored = version byte (1) || 96-bit random nonce || ciphertext and 128-bit tag
    AAD    = the Redis key name

Binding both the key and the AAD to the Redis key name means a value copied to another
key (another set's, or the access-token key of the same set) does not open. A random
96-bit nonce per value is safe for far more values than a set ever stores (NIST SP
800-38D allows 2**32 per key). A value that does not open (another client secret after
a rotation, tampering, a future format) raises :class:`Unsealable`; callers treat it as
absent.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
_SALT = b"bol-proxy shared state, sealed values, v1"
_NONCE = 12  # bytes: the 96-bit nonce GCM is designed for
_TAG = 16


class Unsealable(Exception):
    """A stored value does not open with this set's key (never carries the value)."""


class Sealer:
    """Seals and opens values of one credential set, keyed by its client secret."""

    def __init__(self, client_secret: str, purpose: str = "token store") -> None:
        self._secret = client_secret.encode()
        self._purpose = purpose.encode()
        self._keys: dict[str, AESGCM] = {}

    def __repr__(self) -> str:
        return "Sealer(**********)"

    def _cipher(self, key_name: str) -> AESGCM:
        # One derivation per Redis key and process: HKDF runs once, not per value.
        cipher = self._keys.get(key_name)
        if cipher is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT,
                        info=self._purpose + b"\x00" + key_name.encode())
            cipher = self._keys[key_name] = AESGCM(hkdf.derive(self._secret))
        return cipher

    def seal(self, key_name: str, plaintext: bytes) -> bytes:
        """``plaintext`` sealed for storage under ``key_name``."""
        nonce = os.urandom(_NONCE)
        sealed = self._cipher(key_name).encrypt(nonce, plaintext, key_name.encode())
        return bytes([VERSION]) + nonce + sealed

    def open(self, key_name: str, stored: bytes) -> bytes:
        """The plaintext of a value read from ``key_name``; :class:`Unsealable` if it
        was sealed under another key, another secret, or was altered."""
        if len(stored) < 1 + _NONCE + _TAG or stored[0] != VERSION:
            raise Unsealable("not a sealed value of this version")
        nonce, sealed = stored[1:1 + _NONCE], stored[1 + _NONCE:]
        try:
            return self._cipher(key_name).decrypt(nonce, sealed, key_name.encode())
        except InvalidTag:
            raise Unsealable("the value does not open with this set's key") from None
