"""Rate budgets without sockets: endpoints, bol's headers, and the arithmetic on them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.budgets import (
    IDLE_BUCKET,
    MAX_BUCKETS_PER_SET,
    Bucket,
    Key,
    LocalBudgets,
    Told,
    bucket_of,
    read_told,
)

WALL = 1_800_000_000.0  # the wall clock when the headers are read


@pytest.mark.parametrize(("method", "path", "bucket"), [
    ("GET", "/retailer/orders", "GET /retailer/orders"),
    ("GET", "/retailer/orders/1043946570", "GET /retailer/orders/*"),
    ("PUT", "/retailer/offers/13722de8-8182-d161-5422-4a0a1caab5c8/stock",
     "PUT /retailer/offers/*/stock"),
    ("GET", "/retailer/offers/export/0f2a", "GET /retailer/offers/export/*"),
    ("GET", "/retailer-demo/products/8712626055143/placement",
     "GET /retailer-demo/products/*/placement"),
    ("GET", "/shared/process-status/1234", "GET /shared/process-status/*"),
    ("GET", "/retailer/orders/", "GET /retailer/orders/"),
    ("GET", "/retailer/Orders", "GET /retailer/*"),  # not one of bol's fixed words
])
def test_an_endpoint_is_the_method_and_the_path_with_identifiers_collapsed(
        method: str, path: str, bucket: str) -> None:
    assert bucket_of(method, path) == bucket


def head(*items: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in items]


def test_budget_headers_are_read_in_any_letter_case() -> None:
    told = read_told(200, head(("x-ratelimit-limit", "25"), ("X-RATELIMIT-REMAINING", "7"),
                               ("X-RateLimit-Reset", "42")), WALL)
    assert told == Told(limit=25, remaining=7, reset_in=42.0)


@pytest.mark.parametrize(("reset", "seconds"), [
    ("42", 42.0),
    (str(int(WALL) + 30), 30.0),  # epoch seconds
    (str(int(WALL * 1000) + 1500), 1.5),  # epoch milliseconds
    (str(int(WALL) - 5), 0.0),  # a moment already past
], ids=["seconds-until", "epoch-seconds", "epoch-milliseconds", "past"])
def test_reset_is_seconds_until_or_an_epoch_moment_told_apart_by_size(
        reset: str, seconds: float) -> None:
    assert read_told(200, head(("X-RateLimit-Reset", reset)), WALL).reset_in == seconds


def test_retry_after_is_read_from_a_429_as_seconds_or_an_http_date() -> None:
    assert read_told(429, head(("Retry-After", "4")), WALL).retry_after == 4.0
    date = "Fri, 15 Jan 2027 08:00:10 GMT"  # WALL is 2027-01-15 08:00:00 UTC
    assert read_told(429, head(("Retry-After", date)), WALL).retry_after == 10.0
    assert read_told(200, head(("Retry-After", "4")), WALL).retry_after is None


@pytest.mark.parametrize("value", ["", "many", "-3", "nan", "inf", "1e999"])
def test_unreadable_budget_values_are_ignored(value: str) -> None:
    told = read_told(200, head(("X-RateLimit-Limit", value), ("X-RateLimit-Reset", value)),
                     WALL)
    assert (told.limit, told.reset_in) == (None, None)


# -------------------------------------------------------------------- one bucket


def learned(limit: int, remaining: int, reset_in: float, now: float = 0.0) -> Bucket:
    bucket = Bucket()
    assert bucket.take(now) is None
    bucket.learn(Told(limit, remaining, reset_in), now)
    return bucket


def test_an_unknown_bucket_lets_one_request_go_until_bol_answers() -> None:
    bucket = Bucket()
    assert bucket.take(0) is None
    assert bucket.take(0) == math.inf  # wait for the first answer
    bucket.learn(Told(10, 9, 3.0), 0.1)
    assert bucket.take(0.1) is None


def test_requests_under_way_count_against_what_remains() -> None:
    bucket = learned(limit=10, remaining=2, reset_in=3.0)
    assert bucket.take(0) is None
    assert bucket.take(0) is None
    assert bucket.take(0) == 3.0  # two under way spend the two left: until the reset


def test_the_budget_refills_at_the_reset() -> None:
    bucket = learned(limit=10, remaining=0, reset_in=3.0)
    assert bucket.take(2.9) == 3.0
    assert bucket.take(3.0) is None


def test_answers_that_overtake_each_other_keep_the_lowest_count_of_a_window() -> None:
    bucket = learned(limit=10, remaining=5, reset_in=3.0)
    bucket.take(0)
    bucket.learn(Told(10, 7, 2.9), 0.1)  # an older answer, late
    assert bucket.remaining == 5


def test_a_new_window_replaces_the_old_count() -> None:
    bucket = learned(limit=10, remaining=0, reset_in=3.0)
    assert bucket.take(3.5) is None
    bucket.learn(Told(10, 9, 3.0), 3.5)
    assert (bucket.remaining, bucket.reset_at) == (9, 6.5)


def test_a_429_blocks_until_retry_after() -> None:
    bucket = learned(limit=10, remaining=3, reset_in=30.0)
    bucket.take(0)
    bucket.learn(Told(retry_after=4.0, refused=True), 1.0)
    assert bucket.take(4.9) == 5.0
    assert bucket.take(5.0) is None


def test_a_429_without_retry_after_blocks_until_the_reset() -> None:
    bucket = learned(limit=10, remaining=3, reset_in=30.0)
    bucket.take(0)
    bucket.learn(Told(refused=True), 1.0)
    assert bucket.take(1.0) == 30.0


def test_a_bare_429_backs_off_and_the_backoff_doubles_while_they_repeat() -> None:
    bucket = Bucket()
    waits = []
    now = 0.0
    for _ in range(4):
        assert bucket.take(now) is None
        bucket.learn(Told(refused=True), now)
        waits.append(bucket.blocked_until - now)
        now = bucket.blocked_until
    assert waits == [1.0, 2.0, 4.0, 8.0]
    bucket.take(now)
    bucket.learn(Told(), now)  # an answer that is not a 429
    assert bucket.backoff == 1.0


def test_an_endpoint_that_answers_without_budget_headers_is_not_metered() -> None:
    bucket = Bucket()
    bucket.take(0)
    bucket.learn(Told(), 0)
    assert all(bucket.take(0) is None for _ in range(100))


def test_an_unmetered_endpoint_is_unmetered_again_after_a_429_has_passed() -> None:
    bucket = Bucket()
    bucket.take(0)
    bucket.learn(Told(refused=True, retry_after=1.0), 0)  # bol's one 429, no budget said
    bucket.take(1.0)
    bucket.learn(Told(), 1.0)  # the next answer says nothing of a budget
    assert all(bucket.take(1.0) is None for _ in range(50))


def test_a_spent_bucket_without_a_reset_lets_one_request_ask() -> None:
    bucket = Bucket()
    bucket.take(0)
    bucket.learn(Told(limit=10, remaining=0), 0)  # no Reset header
    assert bucket.take(0) is None
    assert bucket.take(0) == math.inf


def test_a_request_that_was_never_sent_gives_its_budget_back() -> None:
    bucket = learned(limit=10, remaining=1, reset_in=3.0)
    assert bucket.take(0) is None
    bucket.release(0)
    assert bucket.take(0) is None


@pytest.mark.parametrize(("ahead", "expected"), [(0, 2.0), (9, 2.0), (10, 5.0), (25, 8.0)])
def test_the_wait_estimate_counts_whole_windows_for_the_queue_ahead(
        ahead: int, expected: float) -> None:
    bucket = learned(limit=10, remaining=0, reset_in=3.0)  # window: 3 s
    assert bucket.estimate(ahead, now=1.0) == expected


def test_the_wait_estimate_starts_after_a_block() -> None:
    bucket = learned(limit=10, remaining=0, reset_in=3.0)
    bucket.take(3.0)
    bucket.learn(Told(retry_after=10.0, refused=True), 3.0)
    assert bucket.estimate(0, now=3.0) == 10.0


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "answer", "release", "tick"]),
                          st.integers(0, 30), st.floats(0, 5)), max_size=60))
def test_a_bucket_never_lets_more_go_than_bol_said_remains(
        steps: list[tuple[str, int, float]]) -> None:
    bucket, now, out = Bucket(), 0.0, 0
    limit = 5
    for action, remaining, seconds in steps:
        if action == "take":
            before = bucket.available(now)
            if bucket.take(now) is None:
                out += 1
                assert not bucket.answered or before is None or before > 0
        elif action == "answer" and out:
            out -= 1
            bucket.learn(Told(limit, min(remaining, limit), 3.0), now)
        elif action == "release" and out:
            out -= 1
            bucket.release(now)
        elif action == "tick":
            now += seconds
        assert bucket.in_flight == out


# ------------------------------------------------------------------- the store


def test_a_set_keeps_at_most_its_share_of_buckets_the_least_recently_used_making_room(
) -> None:
    dropped: list[Key] = []
    store = LocalBudgets(dropped.append)
    real = ("seta", "GET /retailer/orders")
    for i in range(3 * MAX_BUCKETS_PER_SET):
        store.take(real, 0.0)  # a real endpoint, used all along
        store.learn(real, Told(10, 9, 1.0), 0.0)
        made_up = ("seta", f"GET /retailer/x{i}")
        assert store.take(made_up, 0.0) is None
        store.learn(made_up, Told(), 0.0)  # bol's 404
    assert len(store) == MAX_BUCKETS_PER_SET
    bucket = store.get(real)
    assert bucket is not None and bucket.limit == 10  # still there, with what bol taught it
    assert len(dropped) == 2 * MAX_BUCKETS_PER_SET + 1


def test_a_bucket_with_requests_under_way_is_not_the_one_that_makes_room() -> None:
    store = LocalBudgets()
    first = ("seta", "GET /retailer/first")
    store.take(first, 0.0)  # under way, never answered
    for i in range(MAX_BUCKETS_PER_SET + 5):
        store.take(("seta", f"GET /retailer/y{i}"), 0.0)
        store.learn(("seta", f"GET /retailer/y{i}"), Told(), 0.0)
    assert store.get(first) is not None


def test_idle_buckets_are_dropped() -> None:
    store = LocalBudgets()
    store.take(("seta", "GET /retailer/orders"), 0.0)
    store.learn(("seta", "GET /retailer/orders"), Told(10, 9, 1.0), 0.0)
    for i in range(300):  # creations sweep idle buckets from time to time
        store.take(("setb", f"GET /retailer/y{i}"), IDLE_BUCKET + 2)
    assert store.get(("seta", "GET /retailer/orders")) is None


def test_a_forgotten_set_loses_its_buckets() -> None:
    store = LocalBudgets()
    store.take(("seta", "GET /retailer/orders"), 0)
    store.take(("setb", "GET /retailer/orders"), 0)
    store.forget(["seta"])
    assert [s.set_name for s in store.snapshot(0)] == ["setb"]
