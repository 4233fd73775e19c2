"""Access tokens and refresh tokens shared by replicas through Redis.

Keys, under ``shared_state.key_prefix`` (the braces keep a group in one Redis Cluster slot,
so that a script may touch two of its keys):

    {cc:<digest of client_id>}:token         a client-credentials account: one token,
    {cc:<digest of client_id>}:lock          whatever a set holding it is called
    {rt:<set>:<digest of client_id>}:token   a refresh-token set: a partner has one client
    {rt:<set>:<digest of client_id>}:lock    id and a connection per seller (set)
    {rt:<set>:<digest of client_id>}:refresh hash: version, sealed refresh token (no TTL)

``token`` is the sealed access token with a Redis TTL equal to its remaining life, so a
reader gets the remaining life from PTTL in the same transaction: no replica's clock is
compared with another's.

How a renewal goes (:class:`SharedSupply`; when it is due is still decided by each
replica's :class:`~proxy.tokens.RenewalPolicy`, jitter included, so replicas come due at
different moments):

1. read the shared token: if it lives longer than the one held here, and more than the
   refresh margin, adopt it (no token request);
2. else take the lease on the group (:class:`~proxy.shared.Lease`); holding it, read again
   (another replica may just have stored one), else obtain a token, store it, release;
3. a replica that does not get the lease polls the shared token until the holder stores
   one or lets go (a few seconds at most): then it adopts, or takes the lease itself. If
   the holder does not deliver, a client-credentials set fetches a token of its own (one
   extra token costs little) and stores it unless one is there by then; a refresh-token
   set never does, and tries again a second later.

Refresh tokens (:class:`SharedRefresh`) are spent only under the lease: read the record
(seeded from ``refresh_token_file`` as version 1 when Redis has none), confirm the lease
(a failed compare-and-pexpire means another replica may hold it: spend nothing), spend,
and if bol rotated it, store the new one with a compare-and-set on (version read, lease
owner) *before* the new access token is used; then the file copy. A replica that lost
the compare-and-set (frozen past its lease while another refreshed) discards what it
got and adopts the shared state.

The residual risk, which no client can close: a holder frozen or killed *after* its
refresh request reached bol and before its compare-and-set loses that rotation (bol has
no fencing token to refuse the late spend or the next one). The lease outlasts the
token request's whole timeout, so only a frozen or killed holder can be overtaken, never
a merely slow one.

Redis down: client-credentials sets fetch tokens of their own (as a single replica
does); refresh-token sets keep their valid access token and never refresh (the failure
``shared_state_down``, retried every second), so no refresh token is ever spent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import redis.asyncio as redis

from .config import CredentialSet, Secret, TokenPolicy
from .oauth import Grant, TokenClient, TokenEndpointError, refresh_form
from .refresh import ExpiryWarning, RefreshTokenFile, RefreshTokenMissing
from .sealed import Sealer, Unsealable
from .shared import Lease, SharedStateDown, SharedStore
from .tokens import (
    SHARED_BUSY,
    SHARED_CONFLICT,
    SHARED_STATE_DOWN,
    Clock,
    Obtain,
    Obtained,
    Token,
)

log = logging.getLogger("proxy.tokens")

POLL = 0.1  # seconds between looks at the shared token while another replica renews it
# Seconds to wait for another replica's renewal before giving up on it for this attempt:
# a token request takes well under a second, and a holder that died keeps its lease for
# up to a whole lease (more than 25 s), far too long for a set without a token.
HOLDER_WAIT = 5.0
LEASE_SLACK = 5.0  # seconds the lease outlasts a whole token request

# KEYS[1] = token, ARGV[1] = the sealed value that bol refused. Only that one goes.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] = refresh record, KEYS[2] = lock; ARGV[1] = the version read, ARGV[2] = the lease
# owner ('' to skip that check), ARGV[3] = the sealed new refresh token. An absent record
# is version 0, so seeding is the same compare-and-set. -1: lease lost, -2: version moved.
_CAS = """
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local v = redis.call('HGET', KEYS[1], 'version') or '0'
if v ~= ARGV[1] then return -2 end
local n = tonumber(v) + 1
redis.call('HSET', KEYS[1], 'version', n, 'token', ARGV[3])
return n
"""
# KEYS[1] = refresh record; ARGV[1] = sealed token. A new authorisation: whatever was there.
_AUTHORISE = """
local n = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') + 1
redis.call('HSET', KEYS[1], 'version', n, 'token', ARGV[1])
return n
"""
LEASE_LOST, VERSION_MOVED = -1, -2


def digest(client_id: str) -> str:
    """A short digest of a client id: key names need not show which account they hold."""
    return hashlib.sha256(client_id.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class SharedToken:
    """An access token as read from Redis, placed on this replica's clock."""

    value: Secret
    lifetime: float  # its whole lifetime (expires_in), for the renewal policy
    expires_at: float  # monotonic; read before the command was sent, so never late
    stored: bytes  # the sealed form, for the compare-and-delete after a 401

    def __repr__(self) -> str:
        return f"SharedToken(expires_at={self.expires_at:.1f})"


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at a group: its token, whether the lease is held, the refresh version."""

    token: SharedToken | None
    locked: bool
    version: int | None = None


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    version: int  # 0: none in Redis
    token: Secret | None  # None: absent, or sealed under another secret

    def __repr__(self) -> str:
        return f"RefreshRecord(version={self.version})"


class TokenGroup:
    """The keys of one credential set in Redis, and the reads and writes on them."""

    def __init__(self, store: SharedStore, cred: CredentialSet, clock: Clock) -> None:
        self.store = store
        self.cred = cred
        self._clock = clock
        self.refresh_grant = cred.grant == "refresh_token"
        tag = (f"{{rt:{cred.name}:{digest(cred.client_id)}}}" if self.refresh_grant
               else f"{{cc:{digest(cred.client_id)}}}")
        self.token_key = store.key(tag, "token")
        self.lock_key = store.key(tag, "lock")
        self.refresh_key = store.key(tag, "refresh")
        self._sealer = Sealer(cred.client_secret.reveal())
        self._warned: set[str] = set()

    def _open(self, key: str, stored: bytes) -> bytes | None:
        try:
            return self._sealer.open(key, stored)
        except Unsealable:
            if key not in self._warned:  # once per key: not on every renewal
                self._warned.add(key)
                log.warning("set %s: a value in the shared state does not open with this set's "
                            "client secret (another secret, or altered); taken as absent",
                            self.cred.name)
            return None

    async def read(self) -> Reading:
        """The shared token, the lease's presence and the refresh version, atomically."""
        sent_at = self._clock.monotonic()

        async def look(r: redis.Redis) -> list[object]:
            async with r.pipeline(transaction=True) as pipe:
                pipe.get(self.token_key)
                pipe.pttl(self.token_key)
                pipe.exists(self.lock_key)
                if self.refresh_grant:
                    pipe.hget(self.refresh_key, "version")
                result: list[object] = await pipe.execute()
                return result

        answer = await self.store.run(look)
        stored, pttl, locked = answer[0], answer[1], bool(answer[2])
        version = int(answer[3]) if len(answer) > 3 and answer[3] is not None else None  # type: ignore[call-overload]
        token = None
        if isinstance(stored, bytes) and isinstance(pttl, int) and pttl > 0:
            plain = self._open(self.token_key, stored)
            if plain is not None:
                data = json.loads(plain)
                token = SharedToken(Secret(data["access_token"]), float(data["lifetime"]),
                                    sent_at + pttl / 1000, stored)
        return Reading(token, locked, version)

    async def store_token(self, value: Secret, lifetime: float, remaining: float,
                          only_if_absent: bool = False) -> None:
        """Store an access token for the ``remaining`` seconds of its life."""
        ms = int(remaining * 1000)
        if ms <= 0:
            return
        plain = json.dumps({"access_token": value.reveal(), "lifetime": lifetime}).encode()
        sealed = self._sealer.seal(self.token_key, plain)
        await self.store.run(lambda r: r.set(self.token_key, sealed, px=ms, nx=only_if_absent))

    async def delete_token(self, token: SharedToken) -> bool:
        """Remove ``token`` (bol refused it) if it is still the one stored."""
        script = self.store.script(_DELETE_IF)
        deleted = await self.store.run(
            lambda r: script(keys=[self.token_key], args=[token.stored], client=r))
        return bool(deleted)

    async def read_refresh(self) -> RefreshRecord:
        fields: dict[bytes, bytes] = await self.store.run(
            lambda r: r.hgetall(self.refresh_key))  # type: ignore[arg-type,return-value]
        version = int(fields.get(b"version", b"0"))
        stored = fields.get(b"token")
        plain = self._open(self.refresh_key, stored) if stored else None
        return RefreshRecord(version, Secret(plain.decode()) if plain is not None else None)

    async def swap_refresh(self, version: int, owner: str, token: Secret) -> int:
        """Compare-and-set: the new version, or LEASE_LOST / VERSION_MOVED."""
        sealed = self._sealer.seal(self.refresh_key, token.reveal().encode())
        script = self.store.script(_CAS)
        outcome = await self.store.run(lambda r: script(
            keys=[self.refresh_key, self.lock_key], args=[str(version), owner, sealed],
            client=r))
        return int(outcome)

    async def authorise(self, token: Secret) -> int:
        """A new authorisation replaces whatever was there; the new version."""
        sealed = self._sealer.seal(self.refresh_key, token.reveal().encode())
        script = self.store.script(_AUTHORISE)
        return int(await self.store.run(
            lambda r: script(keys=[self.refresh_key], args=[sealed], client=r)))


Checkpoint = Callable[[str], Awaitable[None]]


class SharedRefresh:
    """Spends a set's refresh token under the lease; keeps the file a current copy."""

    def __init__(self, group: TokenGroup, client: TokenClient, file: RefreshTokenFile,
                 wall: Callable[[], float] = time.time,
                 before_spend: Checkpoint | None = None,
                 on_conflict: Callable[[str], None] | None = None) -> None:
        self.group = group
        self.cred = group.cred
        self._client = client
        self.file = file
        self._warning = ExpiryWarning(self.cred, file, wall)
        self._before_spend = before_spend
        self._on_conflict = on_conflict
        self._file_version = 0  # the version this replica last wrote to its file
        self._pending: tuple[int, Secret] | None = None  # rotated; Redis did not confirm

    async def spend(self, lease: Lease) -> Grant:
        """Refresh once, holding ``lease``. Raises TokenEndpointError (``shared_conflict``
        when another replica overtook this one), or SharedStateDown."""
        await self.publish_pending()
        record = await self.group.read_refresh()
        if record.token is None:
            record = await self._seed(record, lease)
        assert record.token is not None
        self._copy_to_file(record.version, record.token)
        if self._before_spend is not None:
            await self._before_spend(self.cred.name)
        # The last moment before the token leaves: if the lease is no longer ours,
        # another replica may be spending this very token. Spend nothing.
        if not await lease.confirm():
            raise TokenEndpointError(SHARED_CONFLICT, "the lease ran out before the refresh "
                                     "token was spent; nothing was spent")
        try:
            grant = await self._client.request(self.cred, refresh_form(record.token))
        finally:
            self._warning.check()
        if grant.refresh_token is not None and grant.refresh_token != record.token:
            await self._store_rotation(record.version, lease, grant.refresh_token)
        return grant

    async def _seed(self, record: RefreshRecord, lease: Lease) -> RefreshRecord:
        try:
            token = self.file.read()
        except RefreshTokenMissing as exc:
            raise exc.needs_authorize(self.cred.name, " in the shared state nor in the file") \
                from None
        version = await self.group.swap_refresh(record.version, lease.owner, token)
        if version < 0:
            raise TokenEndpointError(SHARED_CONFLICT, "the refresh record changed while it "
                                     "was being seeded")
        log.info("set %s: refresh token copied from %s into the shared state (version %d)",
                 self.cred.name, self.file.path, version)
        self._file_version = version
        return RefreshRecord(version, token)

    async def _store_rotation(self, version: int, lease: Lease, token: Secret) -> None:
        try:
            outcome = await self.group.swap_refresh(version, lease.owner, token)
        except SharedStateDown:
            # Whether Redis applied it is unknown. Keep it: the file now, Redis as soon as
            # it answers (before this replica does anything else with the set).
            self._pending = (version, token)
            self._write_file(token)
            log.error("set %s: Redis did not confirm storing the rotated refresh token; it is "
                      "kept in %s and stored in Redis when Redis answers again",
                      self.cred.name, self.file.path)
            return
        if outcome in (LEASE_LOST, VERSION_MOVED):
            if self._on_conflict is not None:
                self._on_conflict(self.cred.name)
            log.error("set %s: another replica refreshed while this one's lease had run out "
                      "(it was frozen or stalled); the refresh token it got is discarded and "
                      "the shared one is used", self.cred.name)
            raise TokenEndpointError(SHARED_CONFLICT, "another replica refreshed meanwhile")
        log.info("set %s: refresh token rotated and stored (version %d)", self.cred.name,
                 outcome)
        self._copy_to_file(outcome, token)

    async def publish_pending(self) -> None:
        """Store a rotation Redis did not confirm, unless Redis has moved on."""
        if self._pending is None:
            return
        version, token = self._pending
        outcome = await self.group.swap_refresh(version, "", token)
        self._pending = None
        if outcome > 0:
            log.warning("set %s: the rotated refresh token is now stored (version %d)",
                        self.cred.name, outcome)
            return
        record = await self.group.read_refresh()
        if record.token != token:  # else: the first write had been applied after all
            log.error("set %s: the shared state moved on before a rotated refresh token could "
                      "be stored; the connection may need bol-proxy authorize %s",
                      self.cred.name, self.cred.name)

    async def follow(self, version: int | None) -> None:
        """Rewrite the file copy when Redis holds a newer version than the file has."""
        if version is None or version <= self._file_version:
            return
        record = await self.group.read_refresh()
        if record.token is not None:
            self._copy_to_file(record.version, record.token)

    def _copy_to_file(self, version: int, token: Secret) -> None:
        if version <= self._file_version:
            return
        self._file_version = version
        try:
            if self.file.read() == token:
                return
        except RefreshTokenMissing:
            pass
        self._write_file(token)

    def _write_file(self, token: Secret) -> None:
        try:
            self.file.save(token)
        except OSError as exc:  # Redis is the token's home now; the file is a copy
            self.file.forget()
            log.error("set %s: could not write the refresh token copy to %s (%s)",
                      self.cred.name, self.file.path, exc.strerror or type(exc).__name__)


class SharedSupply:
    """Renewals of one set through Redis (see the module docstring for the steps)."""

    def __init__(self, group: TokenGroup, clock: Clock, lease_ttl: float,
                 fetch: Obtain | None = None, refresh: SharedRefresh | None = None,
                 poll: float = POLL) -> None:
        assert (fetch is None) != (refresh is None)
        self.group = group
        self._clock = clock
        self.lease_ttl = lease_ttl
        self._fetch = fetch
        self.refresh = refresh
        self._poll = poll
        self._never = asyncio.Event()  # nobody sets it: polls wait on the clock alone

    async def obtain(self, held: Token | None, refused: Secret | None,
                     settings: TokenPolicy) -> Obtained:
        try:
            return await self._shared(held, refused, settings)
        except SharedStateDown:
            if self._fetch is None:
                raise TokenEndpointError(
                    SHARED_STATE_DOWN, "the shared state (Redis) is unreachable, and a "
                    "refresh-token set never refreshes without it") from None
            return await self._alone()

    async def _alone(self) -> Obtained:
        assert self._fetch is not None
        sent_at = self._clock.monotonic()
        return Obtained(await self._fetch(), sent_at)

    async def _shared(self, held: Token | None, refused: Secret | None,
                      settings: TokenPolicy) -> Obtained:
        if self.refresh is not None:
            await self.refresh.publish_pending()
        deadline = self._clock.monotonic() + min(self.lease_ttl, HOLDER_WAIT)
        reading = await self._read(refused)
        while True:
            if self._adoptable(reading.token, held, settings):
                return self._adopt(reading.token)
            lease = await Lease.acquire(self.group.store, self.group.lock_key, self.lease_ttl,
                                        self._clock)
            if lease is not None:
                async with lease:
                    reading = await self._read(refused)
                    if self._adoptable(reading.token, held, settings):
                        return self._adopt(reading.token)
                    return await self._renew(lease, held, refused, settings)
            reading = await self._wait_for_holder(held, refused, settings, deadline)
            if self._adoptable(reading.token, held, settings):
                continue
            if reading.locked or self._clock.monotonic() >= deadline:
                if self._fetch is not None:
                    log.info("set %s: the replica renewing the shared token did not deliver; "
                             "fetching one of its own", self.group.cred.name)
                    obtained = await self._alone()
                    await self._store(obtained, settings, only_if_absent=True)
                    return obtained
                raise TokenEndpointError(SHARED_BUSY, "another replica is renewing it")
            # The holder let go without storing a token: take the lease ourselves.

    async def _read(self, refused: Secret | None) -> Reading:
        reading = await self.group.read()
        if self.refresh is not None:
            await self.refresh.follow(reading.version)
        if refused is not None and reading.token is not None and reading.token.value == refused:
            # bol answered 401 to this token: never adopt it again, and remove it from
            # Redis if it is still the one stored there.
            await self.group.delete_token(reading.token)
            reading = replace(reading, token=None)
        return reading

    async def _wait_for_holder(self, held: Token | None, refused: Secret | None,
                               settings: TokenPolicy, deadline: float) -> Reading:
        while True:
            await self._clock.wait(self._never, self._poll)
            reading = await self._read(refused)
            if (self._adoptable(reading.token, held, settings) or not reading.locked
                    or self._clock.monotonic() >= deadline):
                return reading

    async def _renew(self, lease: Lease, held: Token | None, refused: Secret | None,
                     settings: TokenPolicy) -> Obtained:
        sent_at = self._clock.monotonic()
        if self.refresh is None:
            assert self._fetch is not None
            grant = await self._fetch()
        else:
            try:
                grant = await self.refresh.spend(lease)
            except TokenEndpointError as exc:
                if exc.code != SHARED_CONFLICT:
                    raise
                # Overtaken: what the other replica stored is the state to go on with.
                reading = await self._read(refused)
                if self._adoptable(reading.token, held, settings):
                    return self._adopt(reading.token)
                raise
        obtained = Obtained(grant, sent_at)
        await self._store(obtained, settings)
        return obtained

    async def _store(self, obtained: Obtained, settings: TokenPolicy,
                     only_if_absent: bool = False) -> None:
        grant = obtained.grant
        lifetime = grant.expires_in if grant.expires_in is not None else settings.default_ttl
        remaining = obtained.sent_at + lifetime - self._clock.monotonic()
        # If Redis fails now, this replica still has its token; the others fetch or wait.
        with contextlib.suppress(SharedStateDown):
            await self.group.store_token(grant.access_token, lifetime, remaining,
                                         only_if_absent=only_if_absent)

    def _adoptable(self, token: SharedToken | None, held: Token | None,
                   settings: TokenPolicy) -> bool:
        if token is None:
            return False
        if token.expires_at - self._clock.monotonic() <= settings.refresh_margin:
            return False
        return held is None or (token.value != held.value and token.expires_at > held.expires_at)

    def _adopt(self, token: SharedToken | None) -> Obtained:
        assert token is not None
        grant = Grant(token.value, token.lifetime)
        return Obtained(grant, token.expires_at - token.lifetime, adopted=True)


def lease_ttl(connect_timeout: float, answer_timeout: float) -> float:
    """The lease outlasts a whole token request, so only a frozen holder is overtaken."""
    return connect_timeout + answer_timeout + LEASE_SLACK
