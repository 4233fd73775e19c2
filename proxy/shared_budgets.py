"""Rate budgets counted across replicas, in Redis.

Replicas of one set spend one budget at bol, so they count it together: each bucket of
:mod:`proxy.budgets` lives in Redis as a hash (what bol said: limit, remaining, reset,
block, backoff) and a sorted set of the requests under way (one member per request
let go, scored with the moment it stops counting, so that a replica that dies cannot
hold budget for ever). Both change only inside Lua scripts, atomically, and every time
in them is Redis's own (``TIME``): the replicas' clocks never meet.

The arithmetic is the one of :class:`~proxy.budgets.Bucket`, written again in Lua where
Redis runs it; the tests hold the two to the same behaviour. Each script answers the
bucket's state too, which this replica mirrors for what needs no round trip (the
estimate of a wait, ``/_proxy/limits``, the metrics).

When Redis is down or slow (:class:`~proxy.shared.SharedStateDown`), budgets fall back
to this replica's own count (:class:`~proxy.budgets.LocalBudgets`) until it answers
again: a replica then keeps its own tools within bol's budget, and the others theirs.
A request waiting for budget asks Redis again at its reset, or after at most
:data:`POLL` seconds: other replicas' answers do not wake it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

from .budgets import FIRST_BACKOFF, IDLE_BUCKET, MAX_BACKOFF, Key, LocalBudgets, Told
from .config import CredentialSet
from .shared import SharedStateDown, SharedStore

POLL = 0.25  # seconds between questions to Redis while a bucket's answers are awaited
UNDER_WAY_AT_MOST = 60.0  # seconds a request counts as under way in Redis
UNTIL_TOLD = -1  # a script's "wait for an answer" (math.inf here)

# Every script: KEYS[1] the bucket's hash, KEYS[2] its requests under way (a sorted set).
# It answers {admitted or 0, wait in ms, limit, remaining, reset in ms, blocked for ms,
# under way, answered, window ms}; -1 stands for "not known".
_STATE = """
local function state(admitted, wait)
  local b = redis.call('HMGET', KEYS[1], 'limit', 'remaining', 'reset_at', 'blocked',
                       'answered', 'window')
  local reset_in = -1
  if b[3] and tonumber(b[3]) > now then reset_in = tonumber(b[3]) - now end
  local blocked = math.max(0, (tonumber(b[4]) or 0) - now)
  return {admitted, wait, tonumber(b[1]) or -1, tonumber(b[2]) or -1, reset_in, blocked,
          redis.call('ZCARD', KEYS[2]), tonumber(b[5]) or 0, tonumber(b[6]) or 0}
end
local function keep(idle_ms)
  redis.call('PEXPIRE', KEYS[1], idle_ms)
  redis.call('PEXPIRE', KEYS[2], idle_ms)
end
"""
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# ARGV: ticket, ms a request under way counts, idle ms.
_TAKE = _NOW + _STATE + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local b = redis.call('HMGET', KEYS[1], 'limit', 'remaining', 'reset_at', 'blocked', 'answered')
local limit, remaining, reset_at = tonumber(b[1]), tonumber(b[2]), tonumber(b[3])
local blocked, answered = tonumber(b[4]) or 0, b[5] == '1'
local under_way = redis.call('ZCARD', KEYS[2])
local function admit()
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  keep(tonumber(ARGV[3]))
  return state(1, 0)
end
if now < blocked then return state(0, blocked - now) end
if not answered then
  if under_way > 0 then return state(0, -1) end
  return admit()
end
if limit == nil and remaining == nil then return admit() end
local left = remaining or limit
if reset_at and now >= reset_at and limit then left = limit end
if left - under_way > 0 then return admit() end
if reset_at and reset_at > now then return state(0, reset_at - now) end
if under_way > 0 then return state(0, -1) end
return admit()
"""
# ARGV: ticket, limit, remaining, reset in ms, retry after ms, refused (1/0), first and
# longest backoff ms, idle ms; "" for what bol did not say.
_LEARN = _NOW + _STATE + """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'answered', 1)
local b = redis.call('HMGET', KEYS[1], 'remaining', 'reset_at', 'window', 'backoff', 'blocked')
local remaining, reset_at = tonumber(b[1]), tonumber(b[2])
local window, backoff = tonumber(b[3]) or 0, tonumber(b[4]) or tonumber(ARGV[7])
local blocked = tonumber(b[5]) or 0
if ARGV[4] ~= '' then
  local new_reset = now + tonumber(ARGV[4])
  if reset_at == nil or now >= reset_at or new_reset > reset_at + 1000 then remaining = nil end
  reset_at = new_reset
  window = math.max(window, tonumber(ARGV[4]))
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'limit', ARGV[2]) end
if ARGV[3] ~= '' then
  local told = tonumber(ARGV[3])
  if remaining == nil or told < remaining then remaining = told end
end
if ARGV[6] == '1' then
  remaining = 0
  local wait = nil
  if ARGV[5] ~= '' then wait = tonumber(ARGV[5])
  elseif reset_at and reset_at > now then wait = reset_at - now end
  if wait == nil then
    wait = backoff
    backoff = math.min(backoff * 2, tonumber(ARGV[8]))
  end
  blocked = math.max(blocked, now + wait)
  reset_at = blocked
else
  backoff = tonumber(ARGV[7])
  if ARGV[2] == '' and ARGV[3] == '' and ARGV[4] == '' then
    -- no word of budget: not metered (any more), as in proxy.budgets
    redis.call('HDEL', KEYS[1], 'limit')
    remaining, reset_at = nil, nil
    redis.call('HDEL', KEYS[1], 'reset_at')
  end
end
if remaining == nil then redis.call('HDEL', KEYS[1], 'remaining')
else redis.call('HSET', KEYS[1], 'remaining', remaining) end
if reset_at then redis.call('HSET', KEYS[1], 'reset_at', reset_at) end
redis.call('HSET', KEYS[1], 'window', window, 'backoff', backoff, 'blocked', blocked)
keep(tonumber(ARGV[9]))
return state(0, 0)
"""
# ARGV: ticket. A request let go that never reached bol.
_RELEASE = _NOW + _STATE + """
redis.call('ZREM', KEYS[2], ARGV[1])
return state(0, 0)
"""


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(max(0, round(seconds * 1000)))


class SharedBudgets:
    """A :class:`~proxy.budgets.SharedCount` in Redis; ``local`` mirrors what it says,
    and counts alone while Redis is down.

    Each request let go is an *admission* of this replica: a ticket in Redis, or None
    when this replica's own count let it go (Redis down). A ticket whose fate is unknown
    (its script timed out, or the tool left while Redis worked) is an *orphan*, removed
    from Redis as soon as Redis answers again: it must not hold budget for every
    replica until it expires. The fallback counts this replica's own admissions only:
    the mirror's count of requests under way is every replica's, and the others'
    answers never come here."""

    def __init__(self, store: SharedStore, sets: Iterable[CredentialSet],
                 under_way_for: float, local: LocalBudgets) -> None:
        self._store = store
        self._groups = {cred.name: _group(cred) for cred in sets}
        # A request counts until bol's answer, at most this long (a dead replica's or
        # a lost ticket's budget returns by itself).
        self._under_way_ms = _ms(min(under_way_for, UNDER_WAY_AT_MOST))
        self.local = local
        self._admissions: dict[Key, list[str | None]] = {}  # this replica's, under way
        self._orphans: set[tuple[Key, str]] = set()

    def follow(self, sets: Iterable[CredentialSet]) -> None:
        """A reload: the sets now configured."""
        self._groups = {cred.name: _group(cred) for cred in sets}

    def _keys(self, key: Key) -> list[str]:
        set_name, bucket = key
        group = self._groups.get(set_name, f"{set_name}:-")
        tag = self._store.key(f"{{rl:{group}:{bucket}}}")
        return [tag + ":state", tag + ":under-way"]

    async def take(self, key: Key, now: float) -> float | None:
        if self._store.up and self._orphans:
            await self._bury_orphans()
        if not self._store.up:
            return self._take_here(key, now)
        ticket = secrets.token_hex(8)
        script = self._store.script(_TAKE)
        try:
            answer = await self._store.run(partial(
                script, self._keys(key), [ticket, self._under_way_ms, _ms(IDLE_BUCKET)]))
        except SharedStateDown:
            self._orphans.add((key, ticket))  # the script may have run before the timeout
            return self._take_here(key, now)
        except BaseException:
            self._orphans.add((key, ticket))  # the tool left while Redis worked
            raise
        admitted, wait = self._mirror(key, answer, now)
        if admitted:
            self._admissions.setdefault(key, []).append(ticket)
            return None
        # Until told: another replica's answer may free budget, and it cannot wake us.
        return now + (POLL if wait is None else wait)

    def _take_here(self, key: Key, now: float) -> float | None:
        """This replica's own count, while Redis cannot be asked."""
        bucket = self.local.bucket(key, now)
        bucket.in_flight = len(self._admissions.get(key, ()))  # its own requests only
        when = bucket.take(now)
        if when is None:
            self._admissions.setdefault(key, []).append(None)
        return when

    async def learn(self, key: Key, told: Told, now: float) -> None:
        ticket = self._admitted(key)
        if ticket is None:  # let go by this replica's own count (Redis was down)
            self.local.learn(key, told, now)
            return
        script = self._store.script(_LEARN)
        args = [ticket, "" if told.limit is None else str(told.limit),
                "" if told.remaining is None else str(told.remaining), _ms(told.reset_in),
                _ms(told.retry_after), "1" if told.refused else "0", _ms(FIRST_BACKOFF),
                _ms(MAX_BACKOFF), _ms(IDLE_BUCKET)]
        answer = await self._run_with(ticket, key, partial(script, self._keys(key), args))
        if answer is None:
            self.local.learn(key, told, now)
        else:
            self._mirror(key, answer, now)

    async def release(self, key: Key, now: float) -> None:
        ticket = self._admitted(key)
        if ticket is None:
            self.local.release(key, now)
            return
        answer = await self._run_with(ticket, key, partial(self._store.script(_RELEASE),
                                                           self._keys(key), [ticket]))
        if answer is not None:
            self._mirror(key, answer, now)

    async def _run_with(self, ticket: str, key: Key,
                        operation: Callable[[Any], Awaitable[list[int]]]) -> list[int] | None:
        """Run a script that ends ``ticket``; if it cannot be known to have run, the
        ticket becomes an orphan (removed once Redis answers)."""
        try:
            return await self._store.run(operation)
        except SharedStateDown:
            self._orphans.add((key, ticket))
            return None
        except BaseException:
            self._orphans.add((key, ticket))
            raise

    async def _bury_orphans(self) -> None:
        release = self._store.script(_RELEASE)
        for key, ticket in list(self._orphans):
            try:
                await self._store.run(partial(release, self._keys(key), [ticket]))
            except SharedStateDown:
                return  # down again: the next recovery tries again
            self._orphans.discard((key, ticket))

    def _admitted(self, key: Key) -> str | None:
        """One of this replica's admissions for ``key`` ends: its ticket, if any."""
        admissions = self._admissions.get(key)
        if not admissions:
            return None
        ticket = admissions.pop()
        if not admissions:
            del self._admissions[key]
        return ticket

    def _mirror(self, key: Key, answer: list[int], now: float) -> tuple[bool, float | None]:
        """Note what Redis said of the bucket; (admitted, seconds to wait or None)."""
        admitted, wait, limit, remaining, reset_in, blocked, under_way, answered, window = (
            int(v) for v in answer)
        bucket = self.local.bucket(key, now)
        bucket.limit = None if limit < 0 else limit
        bucket.remaining = None if remaining < 0 else remaining
        bucket.reset_at = None if reset_in < 0 else now + reset_in / 1000
        bucket.blocked_until = now + blocked / 1000 if blocked else 0.0
        bucket.in_flight = under_way  # every replica's: for estimates (see _take_here)
        bucket.answered = bool(answered)
        bucket.window = window / 1000
        bucket.last_used = now
        return bool(admitted), (None if wait == UNTIL_TOLD else wait / 1000)

    def forget(self, set_names: Iterable[str]) -> None:
        """This replica's part only: the buckets in Redis belong to every replica, and
        expire by themselves once idle. Its tickets there are orphans now."""
        gone = set(set_names)
        for key in [k for k in self._admissions if k[0] in gone]:
            for ticket in self._admissions.pop(key):
                if ticket is not None:
                    self._orphans.add((key, ticket))


def _group(cred: CredentialSet) -> str:
    """A set's budgets are its client's at bol (per seller, for a partner's sets)."""
    digest = hashlib.sha256(cred.client_id.encode()).hexdigest()[:16]
    return f"{cred.name}:{digest}"

