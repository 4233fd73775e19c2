"""Durable storage of an authorised party's refresh token (SPEC §6.3).

bol may rotate the refresh token on every refresh, after which only the newest one works.
A rotated token that is not on disk before it is relied on loses the seller's
authorisation, so a new token is written like this (POSIX rename is atomic):

    write to a temporary file in the same folder (mode 0600) -> fsync it
    -> rename over the old file -> fsync the folder

A crash before the rename leaves the old file intact, a crash after it the new one: the
file never holds a partial token. The one window no client can close is between bol
issuing a rotated token and the rename; the proxy keeps it to a single fsync by writing
the token before it does anything else with the answer, and the access token is handed
to requests only after the write.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .config import CredentialSet, Secret
from .oauth import NO_REFRESH_TOKEN, Grant, TokenClient, TokenEndpointError, refresh_form

log = logging.getLogger("proxy.tokens")

AUTHORISATION_LIFETIME = 365 * 86400  # bol: a seller's permission lasts one year
_SINCE_SUFFIX = ".since"  # first-use date for refresh tokens that are not JWTs


class RefreshTokenMissing(Exception):
    """There is no refresh token yet: the seller has to authorise first."""


class RefreshTokenFile:
    """The refresh token of one set, read from and written back to its file."""

    def __init__(self, path: Path, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall
        self._current: Secret | None = None

    def read(self) -> Secret:
        """The newest refresh token: the one in memory, else the file's."""
        if self._current is None:
            try:
                value = self.path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                raise RefreshTokenMissing(f"{self.path} does not exist") from None
            except (OSError, UnicodeDecodeError) as exc:
                reason = type(exc).__name__
                raise RefreshTokenMissing(f"cannot read {self.path}: {reason}") from None
            if not value:
                raise RefreshTokenMissing(f"{self.path} is empty")
            self._current = Secret(value)
        return self._current

    def forget(self) -> None:
        """Read the file again next time (after bol refused the token in memory)."""
        self._current = None

    def save(self, token: Secret, *, new_authorisation: bool = False) -> None:
        """Replace the file atomically; the in-memory copy is updated even if that fails,
        so that the next refresh still uses the newest token. ``new_authorisation``
        (``bol-proxy authorize``) starts the one-year count again."""
        self._current = token
        write_atomic(self.path, token.reveal() + "\n")
        if new_authorisation:
            self._since_file().unlink(missing_ok=True)
        self._remember_first_use()

    def authorisation_expiry(self) -> float | None:
        """Unix time at which the seller's authorisation ends, if known."""
        try:
            token = self.read()
        except RefreshTokenMissing:
            return None
        exp = jwt_expiry(token.reveal())
        if exp is not None:
            return exp
        return self._remember_first_use() + AUTHORISATION_LIFETIME

    def _since_file(self) -> Path:
        return self.path.with_name(self.path.name + _SINCE_SUFFIX)

    def _remember_first_use(self) -> float:
        since = self._since_file()
        try:
            return float(since.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            now = self._wall()
            # Only used to warn about expiry; the token itself is safe either way.
            with contextlib.suppress(OSError):
                write_atomic(since, f"{now:.0f}\n")
            return now


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (only used to warn)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


class RefreshGrant:
    """Obtains access tokens for a ``grant: refresh_token`` set and keeps its file current."""

    WARN_BEFORE = 60 * 86400  # bol advises renewing the authorisation within two months

    def __init__(self, cred: CredentialSet, client: TokenClient, store: RefreshTokenFile,
                 wall: Callable[[], float] = time.time) -> None:
        self._cred = cred
        self._client = client
        self.store = store
        self._wall = wall
        self._last_warning = -math.inf

    async def __call__(self) -> Grant:
        try:
            current = self.store.read()
        except RefreshTokenMissing as exc:
            # bol was not asked: say what the operator has to do, not "refused".
            raise TokenEndpointError(
                NO_REFRESH_TOKEN, f"no refresh token ({exc}); run: bol-proxy authorize "
                f"{self._cred.name}") from None
        try:
            grant = await self._client.request(self._cred, refresh_form(current))
        except TokenEndpointError as exc:
            if exc.code == "invalid_grant":
                self.store.forget()  # re-read the file: the seller may have re-authorised
            raise
        if grant.refresh_token is not None and grant.refresh_token != current:
            # bol rotated it: only the new one works from now on. Persist before use.
            try:
                self.store.save(grant.refresh_token)
            except OSError as exc:
                log.error("set %s: could not write the rotated refresh token to %s (%s); "
                          "it is kept in memory until the next renewal",
                          self._cred.name, self.store.path, exc.strerror or type(exc).__name__)
            else:
                log.info("set %s: refresh token rotated and saved", self._cred.name)
        self._warn_if_expiring()
        return grant

    def _warn_if_expiring(self) -> None:
        ends = self.store.authorisation_expiry()
        now = self._wall()
        if ends is None or ends - now > self.WARN_BEFORE or now - self._last_warning < 86400:
            return
        self._last_warning = now
        days = max(0, int((ends - now) // 86400))
        log.warning("set %s: the seller's authorisation ends in %d days; run "
                    "bol-proxy authorize %s to renew it", self._cred.name, days, self._cred.name)
