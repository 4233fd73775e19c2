"""Durable storage of an authorised party's refresh token.

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

The file, not a copy in memory, is the token's home: every refresh reads it, and reads,
spends and replaces it while holding an exclusive ``flock`` on ``<file>.lock``. Two
processes given the same file (two proxies on a shared volume, or ``bol-proxy
authorize`` beside a running proxy) so take turns, and the second one spends the token
the first one saved instead of the one it replaced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .config import CredentialSet, Secret
from .oauth import NO_REFRESH_TOKEN, Grant, TokenClient, TokenEndpointError, refresh_form

log = logging.getLogger("proxy.tokens")

AUTHORISATION_LIFETIME = 365 * 86400  # bol: a seller's permission lasts one year
_SINCE_SUFFIX = ".since"  # first-use date for refresh tokens that are not JWTs
_LOCK_SUFFIX = ".lock"
LOCK_WAIT = 60.0  # longest wait for another process's refresh: 3 token answer timeouts
LOCK_POLL = 0.05  # flock has no asyncio form: try again this often while it is taken
TOKEN_FILE_BUSY = "refresh_token_file_busy"


class RefreshTokenMissing(Exception):
    """There is no refresh token yet: the seller has to authorise first."""

    def needs_authorize(self, set_name: str, where: str = "") -> TokenEndpointError:
        """The failed attempt this makes: bol was not asked, so the detail says what the
        operator has to do, not "refused"."""
        return TokenEndpointError(NO_REFRESH_TOKEN, f"no refresh token{where} ({self}); "
                                  f"run: bol-proxy authorize {set_name}")


class RefreshTokenFile:
    """The refresh token of one set, read from and written back to its file."""

    def __init__(self, path: Path, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall
        self._unsaved: Secret | None = None  # rotated, but writing the file failed

    def read(self) -> Secret:
        """The newest refresh token: one that could not be saved, else the file's."""
        if self._unsaved is not None:
            return self._unsaved
        try:
            value = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise RefreshTokenMissing(f"{self.path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RefreshTokenMissing(f"cannot read {self.path}: {type(exc).__name__}") \
                from None
        if not value:
            raise RefreshTokenMissing(f"{self.path} is empty")
        return Secret(value)

    def forget(self) -> None:
        """Drop an unsaved token that bol refused: the file's is read again."""
        self._unsaved = None

    def save(self, token: Secret, *, new_authorisation: bool = False) -> None:
        """Replace the file atomically. If that fails the token is kept in memory, so
        that the next refresh still spends the newest one. ``new_authorisation``
        (``bol-proxy authorize``) starts the one-year count again."""
        self._unsaved = token
        write_atomic(self.path, token.reveal() + "\n")
        self._unsaved = None
        if new_authorisation:
            self._since_file().unlink(missing_ok=True)
        self._remember_first_use()

    @contextlib.asynccontextmanager
    async def locked(self, wait: float = LOCK_WAIT) -> AsyncIterator[None]:
        """Hold ``<file>.lock`` while the token is read, spent and replaced.

        A process that cannot create the lock file (a read-only folder, where no
        rotated token could be saved either) goes on without it. Waiting longer than
        ``wait`` raises :class:`~proxy.oauth.TokenEndpointError` (a failed attempt, retried
        with the usual backoff)."""
        lock_path = self.path.with_name(self.path.name + _LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.debug("no lock on %s (%s): refreshing without it", lock_path,
                      exc.strerror or type(exc).__name__)
            yield
            return
        try:
            deadline = time.monotonic() + wait
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise TokenEndpointError(TOKEN_FILE_BUSY, f"another process has held "
                                             f"{lock_path} for {wait:g} s")
                await asyncio.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # which releases the lock

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


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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

    def __init__(self, cred: CredentialSet, client: TokenClient, store: RefreshTokenFile,
                 wall: Callable[[], float] = time.time) -> None:
        self._cred = cred
        self._client = client
        self.store = store
        self._warning = ExpiryWarning(cred, store, wall)

    async def __call__(self) -> Grant:
        async with self.store.locked():
            grant = await self._refresh()
        self._warning.check()
        return grant

    async def _refresh(self) -> Grant:
        try:
            current = self.store.read()
        except RefreshTokenMissing as exc:
            raise exc.needs_authorize(self._cred.name) from None
        try:
            grant = await self._client.request(self._cred, refresh_form(current))
        except TokenEndpointError as exc:
            if exc.code == "invalid_grant":
                self.store.forget()  # back to the file: the seller may have re-authorised
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
        return grant


class ExpiryWarning:
    """Warns once a day from 60 days before the seller's authorisation ends."""

    WARN_BEFORE = 60 * 86400  # bol advises renewing the authorisation within two months

    def __init__(self, cred: CredentialSet, store: RefreshTokenFile,
                 wall: Callable[[], float] = time.time) -> None:
        self._cred = cred
        self._store = store
        self._wall = wall
        self._last_warning = -math.inf

    def check(self) -> None:
        ends = self._store.authorisation_expiry()
        now = self._wall()
        if ends is None or ends - now > self.WARN_BEFORE or now - self._last_warning < 86400:
            return
        self._last_warning = now
        days = max(0, int((ends - now) // 86400))
        log.warning("set %s: the seller's authorisation ends in %d days; run "
                    "bol-proxy authorize %s to renew it", self._cred.name, days, self._cred.name)
