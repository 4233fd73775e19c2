"""The refresh-token file and the refresh grant, with a fake token endpoint."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, cast

import pytest

from proxy.config import CredentialSet, Secret
from proxy.oauth import Grant, TokenClient, TokenEndpointError
from proxy.refresh import (
    AUTHORISATION_LIFETIME,
    TOKEN_FILE_BUSY,
    RefreshGrant,
    RefreshTokenFile,
    RefreshTokenMissing,
    jwt_expiry,
    write_atomic,
)

T0 = 1_800_000_000.0
DAY = 86400.0
ACCESS = "access-token-0123456789"
FIRST = "refresh-token-one-0123456789"
ROTATED = "refresh-token-two-9876543210"


def jwt(**claims: Any) -> str:
    """An unsigned JWT (RFC 7519 §6: alg none, empty signature) with ``claims``."""

    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


class WallClock:
    """Wall time that moves only when a test sets it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTokenEndpoint:
    """Stands in for TokenClient: records each refresh token sent, answers from a script
    (then with a plain access token), and notes what the file held at each call."""

    def __init__(self, path: Path, *answers: Grant | TokenEndpointError) -> None:
        self.path = path
        self.answers = list(answers)
        self.sent: list[str] = []
        self.file_at_call: list[str | None] = []

    async def request(self, cred: CredentialSet, form: dict[str, str]) -> Grant:
        assert form["grant_type"] == "refresh_token"
        assert cred.name == "partner"
        self.sent.append(form["refresh_token"])
        self.file_at_call.append(self.path.read_text() if self.path.exists() else None)
        answer = self.answers.pop(0) if self.answers else Grant(Secret(ACCESS), 599)
        if isinstance(answer, TokenEndpointError):
            raise answer
        return answer


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def content(path: Path) -> str:
    return path.read_text()


def identity(path: Path) -> tuple[int, int, str]:
    """Inode, modification time and content: all three stay if nobody wrote the file."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_text()


def disk_full(path: Path, text: str) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "partner.refresh"
    path.parent.mkdir()
    path.write_text(FIRST + "\n")
    return path


@pytest.fixture
def wall() -> WallClock:
    return WallClock()


def refresher(path: Path, wall: WallClock,
              *answers: Grant | TokenEndpointError) -> tuple[RefreshGrant, FakeTokenEndpoint]:
    cred = CredentialSet(name="partner", client_id="pid", client_secret=Secret("psecret"),
                         grant="refresh_token", refresh_token_file=path)
    fake = FakeTokenEndpoint(path, *answers)
    store = RefreshTokenFile(path, wall=wall)
    return RefreshGrant(cred, cast(TokenClient, fake), store, wall=wall), fake


# -------------------------------------------------------------------- write_atomic


def test_write_atomic_creates_the_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "token"
    write_atomic(path, "value\n")
    assert path.read_text() == "value\n"
    assert mode(path) == 0o600


def test_write_atomic_replaces_content_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old old old old\n")
    path.chmod(0o644)
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert mode(path) == 0o600


def test_write_atomic_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "token"
    for i in range(3):
        write_atomic(path, f"value {i}\n")
    assert os.listdir(tmp_path) == ["token"]


def test_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "new \udc80 cannot be encoded")  # fails after the temp file exists
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["token"]


def test_write_into_a_folder_that_is_a_file_fails_and_leaves_it(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("keep me\n")
    with pytest.raises(OSError):
        write_atomic(not_a_folder / "token", "value\n")
    assert not_a_folder.read_text() == "keep me\n"
    assert os.listdir(tmp_path) == ["file"]


# --------------------------------------------------------------- RefreshTokenFile


@pytest.mark.parametrize("content", [FIRST, FIRST + "\n", f"  {FIRST}\r\n\n"])
def test_read_returns_the_token_without_surrounding_whitespace(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    assert RefreshTokenFile(path).read().reveal() == FIRST


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "directory"])
def test_no_usable_file_is_refresh_token_missing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "token"
    if kind == "empty":
        path.write_text("")
    elif kind == "blank":
        path.write_text(" \n\n")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(RefreshTokenMissing):
        RefreshTokenFile(path).read()


def test_read_follows_the_file(token_path: Path) -> None:
    store = RefreshTokenFile(token_path)
    assert store.read().reveal() == FIRST
    token_path.write_text("rotated-by-another-process\n")
    assert store.read().reveal() == "rotated-by-another-process"


def test_a_token_that_could_not_be_saved_is_read_until_saved_or_forgotten(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RefreshTokenFile(token_path)
    monkeypatch.setattr("proxy.refresh.write_atomic", disk_full)
    with pytest.raises(OSError):
        store.save(Secret(ROTATED))
    assert store.read().reveal() == ROTATED  # newer than the file's
    store.forget()
    assert store.read().reveal() == FIRST
    monkeypatch.undo()
    store.save(Secret(ROTATED))
    token_path.write_text("rotated-by-another-process\n")
    assert store.read().reveal() == "rotated-by-another-process"


def test_save_writes_the_file_and_the_memory_copy(token_path: Path) -> None:
    store = RefreshTokenFile(token_path)
    store.read()
    store.save(Secret(ROTATED))
    assert token_path.read_text() == ROTATED + "\n"
    assert mode(token_path) == 0o600
    assert store.read().reveal() == ROTATED
    assert RefreshTokenFile(token_path).read().reveal() == ROTATED


# -------------------------------------------------------------------------- expiry


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (jwt(exp=1_831_536_000), 1_831_536_000.0),
        (jwt(exp=1_831_536_000, sub="a"), 1_831_536_000.0),  # payload lengths that
        (jwt(exp=1_831_536_000, sub="ab"), 1_831_536_000.0),  # need different padding
        (jwt(exp=1_831_536_000, sub="abc"), 1_831_536_000.0),
        (jwt(exp=1.5), 1.5),
        (jwt(sub="no-exp"), None),
        (jwt(exp="1831536000"), None),
        (jwt(exp=True), None),
        (jwt(exp=None), None),
        (FIRST, None),
        ("a.b", None),
        ("a.b.c.d", None),
        ("head.!!!.sig", None),
        ("head." + base64.urlsafe_b64encode(b"not json").decode() + ".sig", None),
        ("head." + base64.urlsafe_b64encode(b"[1, 2]").decode() + ".sig", None),
        ("head." + base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode() + ".sig", None),
    ],
)
def test_jwt_expiry_reads_exp_or_gives_none(token: str, expected: float | None) -> None:
    assert jwt_expiry(token) == expected


def test_authorisation_expiry_is_the_jwt_exp(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(jwt(exp=T0 + 100 * DAY) + "\n")
    assert RefreshTokenFile(path, wall=WallClock()).authorisation_expiry() == T0 + 100 * DAY


def test_authorisation_expiry_is_first_use_plus_a_year_for_opaque_tokens(
    token_path: Path
) -> None:
    first = RefreshTokenFile(token_path, wall=WallClock(T0))
    assert first.authorisation_expiry() == T0 + AUTHORISATION_LIFETIME
    assert AUTHORISATION_LIFETIME == 365 * DAY
    later = RefreshTokenFile(token_path, wall=WallClock(T0 + 10 * DAY))  # a restart
    assert later.authorisation_expiry() == T0 + 365 * DAY


def test_authorisation_expiry_is_unknown_without_a_token(tmp_path: Path) -> None:
    assert RefreshTokenFile(tmp_path / "missing").authorisation_expiry() is None


# ------------------------------------------------------------------- RefreshGrant


async def test_refresh_sends_the_stored_token_and_returns_the_answer(
    token_path: Path, wall: WallClock
) -> None:
    grant_source, fake = refresher(token_path, wall)
    grant = await grant_source()
    assert fake.sent == [FIRST]
    assert grant.access_token.reveal() == ACCESS


async def test_rotated_token_is_saved_before_the_grant_is_returned(
    token_path: Path, wall: WallClock
) -> None:
    grant_source, fake = refresher(token_path, wall, Grant(Secret(ACCESS), 599, Secret(ROTATED)))
    await grant_source()
    assert content(token_path) == ROTATED + "\n"
    assert mode(token_path) == 0o600
    await grant_source()
    assert fake.sent == [FIRST, ROTATED]
    assert fake.file_at_call == [FIRST + "\n", ROTATED + "\n"]


@pytest.mark.parametrize("answer_refresh", [None, FIRST])
async def test_unrotated_answer_leaves_the_file_alone(
    token_path: Path, wall: WallClock, answer_refresh: str | None
) -> None:
    before = identity(token_path)
    refresh = None if answer_refresh is None else Secret(answer_refresh)
    grant_source, _ = refresher(token_path, wall, Grant(Secret(ACCESS), 599, refresh))
    await grant_source()
    assert identity(token_path) == before
    assert before[2] == FIRST + "\n"


@pytest.mark.parametrize("code", ["invalid_grant", "invalid_client", "http_500"])
async def test_each_refresh_spends_the_token_the_file_holds_then(
    token_path: Path, wall: WallClock, code: str
) -> None:
    grant_source, fake = refresher(token_path, wall, TokenEndpointError(code, "refused"))
    with pytest.raises(TokenEndpointError) as info:
        await grant_source()
    assert info.value.code == code
    write_atomic(token_path, "re-authorised-token\n")  # `bol-proxy authorize` ran meanwhile
    await grant_source()
    assert fake.sent == [FIRST, "re-authorised-token"]


async def test_missing_file_says_to_authorize_without_asking_bol(
    tmp_path: Path, wall: WallClock
) -> None:
    grant_source, fake = refresher(tmp_path / "never-written", wall)
    with pytest.raises(TokenEndpointError) as info:
        await grant_source()
    assert info.value.code == "no_refresh_token"
    assert not info.value.rejected  # bol refused nothing: it was not asked
    assert info.value.needs_operator  # so retried no faster than a refusal
    assert "bol-proxy authorize partner" in str(info.value)
    assert fake.sent == []


async def test_rotated_token_that_cannot_be_saved_is_logged_and_kept_in_memory(
    token_path: Path, wall: WallClock, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grant_source, fake = refresher(token_path, wall, Grant(Secret(ACCESS), 599, Secret(ROTATED)))
    monkeypatch.setattr("proxy.refresh.write_atomic", disk_full)
    caplog.set_level(logging.DEBUG, logger="proxy.tokens")
    grant = await grant_source()
    assert grant.access_token.reveal() == ACCESS
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "could not write" in errors[0].getMessage()
    await grant_source()
    assert fake.sent == [FIRST, ROTATED]
    assert content(token_path) == FIRST + "\n"


# ------------------------------------------------- processes sharing one file


class RotatingEndpoint:
    """bol with rotation: each refresh token works once and is answered with the next.
    ``gate``, when given, holds the first answer until the test opens it."""

    def __init__(self, first: str, gate: asyncio.Event | None = None) -> None:
        self.valid = first
        self.issued = 0
        self.sent: list[str] = []
        self.gate = gate
        self.asked = asyncio.Event()

    async def request(self, cred: CredentialSet, form: dict[str, str]) -> Grant:
        self.sent.append(form["refresh_token"])
        self.asked.set()
        if self.gate is not None and len(self.sent) == 1:
            await self.gate.wait()
        if form["refresh_token"] != self.valid:
            raise TokenEndpointError("invalid_grant", "refresh token already used")
        self.issued += 1
        self.valid = f"refresh-token-{self.issued}"
        return Grant(Secret(ACCESS), 599, Secret(self.valid))


def sharing(path: Path, bol: RotatingEndpoint) -> RefreshGrant:
    """One process's view of the shared file: its own store, its own lock handle."""
    cred = CredentialSet(name="partner", client_id="pid", client_secret=Secret("psecret"),
                         grant="refresh_token", refresh_token_file=path)
    return RefreshGrant(cred, cast(TokenClient, bol), RefreshTokenFile(path))


async def test_two_processes_sharing_a_token_file_take_turns_and_lose_nothing(
    token_path: Path,
) -> None:
    gate = asyncio.Event()
    bol = RotatingEndpoint(FIRST, gate)
    first, second = sharing(token_path, bol), sharing(token_path, bol)
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        group.create_task(first())
        await bol.asked.wait()  # the first refresh holds the lock, waiting for bol
        group.create_task(second())
        for _ in range(20):
            await asyncio.sleep(0)
        assert bol.sent == [FIRST]  # the second waits for the lock instead of spending FIRST
        gate.set()
    assert bol.sent == [FIRST, "refresh-token-1"]  # it spent what the first one saved
    assert content(token_path) == "refresh-token-2\n"


async def test_a_lock_held_too_long_elsewhere_is_a_failed_attempt(token_path: Path) -> None:
    store = RefreshTokenFile(token_path)
    async with store.locked():  # another process, mid-refresh
        with pytest.raises(TokenEndpointError) as info:
            async with RefreshTokenFile(token_path).locked(wait=0.0):
                pass
    assert info.value.code == TOKEN_FILE_BUSY
    assert not info.value.needs_operator  # retried with the usual backoff
    async with RefreshTokenFile(token_path).locked(wait=0.0):
        pass  # released with its holder


async def test_without_a_usable_lock_file_the_refresh_goes_on(
    token_path: Path, wall: WallClock
) -> None:
    token_path.with_name(token_path.name + ".lock").mkdir()  # cannot be opened as a file
    grant_source, fake = refresher(token_path, wall, Grant(Secret(ACCESS), 599, Secret(ROTATED)))
    await grant_source()
    assert fake.sent == [FIRST]
    assert content(token_path) == ROTATED + "\n"


async def test_the_lock_file_is_private(token_path: Path) -> None:
    async with RefreshTokenFile(token_path).locked():
        pass
    assert mode(token_path.with_name(token_path.name + ".lock")) == 0o600


def expiry_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records
               if r.levelno == logging.WARNING and "authorisation ends" in r.getMessage())


async def test_expiry_warning_is_logged_at_most_once_a_day_within_60_days(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text(jwt(exp=T0 + 59 * DAY) + "\n")
    wall = WallClock(T0)
    grant_source, _ = refresher(path, wall)
    caplog.set_level(logging.WARNING, logger="proxy.tokens")
    for now, count in [(T0, 1), (T0 + 3600, 1), (T0 + DAY - 1, 1), (T0 + DAY, 2),
                       (T0 + DAY + 600, 2), (T0 + 3 * DAY, 3)]:
        wall.now = now
        await grant_source()
        assert expiry_warnings(caplog) == count, f"at T0+{now - T0:g}s"
    assert "59 days" in caplog.records[0].getMessage()


async def test_no_expiry_warning_more_than_60_days_ahead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text(jwt(exp=T0 + 61 * DAY) + "\n")
    wall = WallClock(T0)
    grant_source, _ = refresher(path, wall)
    caplog.set_level(logging.WARNING, logger="proxy.tokens")
    await grant_source()
    assert expiry_warnings(caplog) == 0
    wall.now = T0 + DAY + 1  # now 59 days and change remain
    await grant_source()
    assert expiry_warnings(caplog) == 1


async def test_no_token_reaches_the_logs(
    token_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wall = WallClock(T0 + 330 * DAY)  # first use is now; then move into the warning window
    grant_source, _ = refresher(token_path, wall, Grant(Secret(ACCESS), 599, Secret(ROTATED)),
                                TokenEndpointError("invalid_grant", "refused"))
    caplog.set_level(logging.DEBUG)
    await grant_source()
    with pytest.raises(TokenEndpointError):
        await grant_source()
    wall.now += 310 * DAY
    await grant_source()
    assert expiry_warnings(caplog) == 1
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (ACCESS, FIRST, ROTATED, "psecret"):
        assert secret not in logged


def test_a_new_authorisation_starts_the_year_again(token_path: Path) -> None:
    RefreshTokenFile(token_path, wall=WallClock(T0)).authorisation_expiry()  # first use
    later = RefreshTokenFile(token_path, wall=WallClock(T0 + 200 * DAY))
    later.save(Secret("rt-after-authorize"), new_authorisation=True)
    assert later.authorisation_expiry() == T0 + 200 * DAY + AUTHORISATION_LIFETIME


def test_a_rotation_keeps_the_authorisations_first_use(token_path: Path) -> None:
    RefreshTokenFile(token_path, wall=WallClock(T0)).authorisation_expiry()
    later = RefreshTokenFile(token_path, wall=WallClock(T0 + 200 * DAY))
    later.save(Secret("rt-rotated"))
    assert later.authorisation_expiry() == T0 + AUTHORISATION_LIFETIME
