"""Prometheus metrics, exposed by prometheus-client from a registry per app.

Labels are bounded: credential set names come from the configuration, methods from a
fixed list, statuses as classes (2xx, 4xx, ...). Paths never become labels, since
bol's paths carry order and shipment ids; endpoints do, with their identifiers collapsed
and at most ``MAX_BUCKET_LABELS`` a set. Token values are never read here: the expiry
gauges are computed at scrape time from the token sources.

What every request records (its count and two durations) is counted with plain
arithmetic and turned into Prometheus families at scrape time, as the in-flight gauge
is: prometheus-client's instruments take a lock and validate labels on every call, which
cost a few percent of the proxy's throughput. Everything rarer uses them directly.
"""

from __future__ import annotations

import collections
import contextlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .budgets import MAX_BUCKETS_PER_SET, Key, Snapshot
from .tokens import TokenSource

if TYPE_CHECKING:
    from .shared import SharedStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created doubles every scrape

MAX_BUCKET_LABELS = MAX_BUCKETS_PER_SET  # every bucket kept can have its own
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The proxy's instruments; one instance per running proxy."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # (set, method, status class) -> requests; set -> (whole answer, bol's head)
        self._requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._timings: dict[str, tuple[_Timing, _Timing]] = {}
        r.register(_RequestCollector(self._requests, self._timings))
        self.token_fetches = Counter(
            "bol_proxy_token_fetches", "Token requests to login.bol.com, by set and outcome",
            ["set", "outcome"], registry=r,
        )
        self.adoptions = Counter(
            "bol_proxy_shared_tokens_adopted", "Tokens taken from the shared state, obtained "
            "by another replica (no token request made here)", ["set"], registry=r,
        )
        self.shared_errors = Counter(
            "bol_proxy_shared_state_errors", "Failed calls to the shared state (Redis), by "
            "reason", ["reason"], registry=r,
        )
        self.refresh_conflicts = Counter(
            "bol_proxy_shared_refresh_conflicts", "Refreshes this replica lost to another "
            "one after its lease ran out (a frozen or stalled holder)", ["set"], registry=r,
        )
        self.replays = Counter(
            "bol_proxy_replays", "Requests replayed once after a 401 with a renewed token",
            ["set"], registry=r,
        )
        self.rate_limit_waits = Histogram(
            "bol_proxy_rate_limit_wait_seconds",
            "Time requests waited for their endpoint's budget", ["set", "bucket"],
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120), registry=r,
        )
        self.rate_limit_refusals = Counter(
            "bol_proxy_rate_limit_refusals",
            "Requests answered 429 by the proxy without asking bol (budget spent for "
            "longer than the request may wait)", ["set", "bucket"], registry=r,
        )
        self.upstream_429s = Counter(
            "bol_proxy_upstream_429", "429 answers from bol", ["set", "bucket"], registry=r,
        )
        self._bucket_labels: dict[str, set[str]] = {}
        # A plain counter read at scrape time: no lock on the request path.
        self.in_flight = 0
        Gauge("bol_proxy_in_flight_requests", "Requests being handled",
              registry=r).set_function(lambda: self.in_flight)

    def observe(self, set_name: str, method: str, status: int, seconds: float,
                upstream_seconds: float | None) -> None:
        """Record one answered request."""
        # Keyed by label values, so that made-up methods cannot grow the table.
        self._requests[(set_name, method if method in _METHODS else "OTHER",
                        status // 100)] += 1
        timings = self._timings.get(set_name)
        if timings is None:
            timings = self._timings[set_name] = (_Timing(), _Timing())
        timings[0].observe(seconds)
        if upstream_seconds is not None:
            timings[1].observe(upstream_seconds)

    def bucket_label(self, set_name: str, bucket: str) -> str:
        """The bucket as a label: at most ``MAX_BUCKET_LABELS`` a set, "other" beyond,
        so that made-up paths cannot grow the metrics without bound."""
        known = self._bucket_labels.setdefault(set_name, set())
        if bucket in known:
            return bucket
        if len(known) >= MAX_BUCKET_LABELS:
            return "other"
        known.add(bucket)
        return bucket

    def forget_bucket(self, key: Key) -> None:
        """A bucket was dropped: its label slot and its series go with it."""
        set_name, bucket = key
        labels = self._bucket_labels.get(set_name)
        if labels is None or bucket not in labels:
            return
        labels.discard(bucket)
        for metric in (self.rate_limit_waits, self.rate_limit_refusals, self.upstream_429s):
            with contextlib.suppress(KeyError):
                metric.remove(set_name, bucket)

    def waited(self, set_name: str, bucket: str, seconds: float) -> None:
        self.rate_limit_waits.labels(set_name, self.bucket_label(set_name, bucket)).observe(
            seconds)

    def rate_limited(self, set_name: str, bucket: str) -> None:
        self.rate_limit_refusals.labels(set_name, self.bucket_label(set_name, bucket)).inc()

    def refused_by_bol(self, set_name: str, bucket: str) -> None:
        self.upstream_429s.labels(set_name, self.bucket_label(set_name, bucket)).inc()

    def watch_budgets(self, buckets: Callable[[], Iterable[tuple[Snapshot, int]]]) -> None:
        """Expose each bucket's limit, remaining budget and waiting requests."""
        self.registry.register(_BudgetCollector(buckets, self.bucket_label))

    def token_fetched(self, set_name: str, outcome: str) -> None:
        if outcome == "adopted":
            self.adoptions.labels(set_name).inc()
        else:
            self.token_fetches.labels(set_name, outcome).inc()

    def shared_error(self, reason: str) -> None:
        self.shared_errors.labels(reason).inc()

    def refresh_conflict(self, set_name: str) -> None:
        self.refresh_conflicts.labels(set_name).inc()

    def watch_shared(self, shared: SharedStore | None) -> None:
        """Expose whether the shared state answers (only when it is configured)."""
        if shared is not None:
            Gauge("bol_proxy_shared_state_up", "1 while the shared state (Redis) answers, "
                  "0 while it is down", registry=self.registry).set_function(
                      lambda: 1.0 if shared.up else 0.0)

    def watch_tokens(self, sources: Callable[[], Iterable[TokenSource]],
                     monotonic: Callable[[], float],
                     authorisation_expiry: Callable[[str], float | None]) -> None:
        """Expose time-to-expiry per set and authorisation expiry of refresh-token sets."""
        self.registry.register(_TokenCollector(sources, monotonic, authorisation_expiry))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Timing:
    """A histogram's counts, kept with plain arithmetic (one per set and duration)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BUCKETS, seconds)] += 1  # "le": a bound counts as in
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as the exposition wants them."""
        bounds = [*(repr(float(b)) for b in _BUCKETS), "+Inf"]
        return list(zip(bounds, accumulate(self.counts), strict=True))


class _RequestCollector(Collector):
    def __init__(self, requests: collections.Counter[tuple[str, str, int]],
                 timings: dict[str, tuple[_Timing, _Timing]]) -> None:
        self._requests = requests
        self._timings = timings

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "bol_proxy_requests", "Requests answered, by credential set, method and status "
            "class", labels=["set", "method", "status_class"])
        for (set_name, method, status_class), count in list(self._requests.items()):
            requests.add_metric([set_name, method, f"{status_class}xx"], count)
        yield requests
        for index, name, text in (
            (0, "bol_proxy_request_duration_seconds", "Time from request to answer in the "
                                                      "proxy"),
            (1, "bol_proxy_upstream_duration_seconds", "Time until bol's response headers "
                                                       "arrived"),
        ):
            family = HistogramMetricFamily(name, text, labels=["set"])
            for set_name, timings in list(self._timings.items()):
                timing = timings[index]
                family.add_metric([set_name], timing.buckets(), timing.sum)
            yield family


class _BudgetCollector(Collector):
    def __init__(self, buckets: Callable[[], Iterable[tuple[Snapshot, int]]],
                 label: Callable[[str, str], str]) -> None:
        self._buckets = buckets
        self._label = label

    def collect(self) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(f"bol_proxy_rate_limit_{name}", text,
                                    labels=["set", "bucket"])
            for name, text in (
                ("limit", "The endpoint's budget per window, as bol last said"),
                ("remaining", "Budget left now (bol's count less requests under way)"),
                ("waiting", "Requests waiting for the endpoint's budget"),
            )
        }
        for snapshot, waiting in self._buckets():
            labels = [snapshot.set_name, self._label(snapshot.set_name, snapshot.bucket)]
            if labels[1] == "other":
                continue  # a gauge cannot sum buckets beyond the labelled ones
            if snapshot.limit is not None:
                families["limit"].add_metric(labels, snapshot.limit)
            if snapshot.remaining is not None:
                families["remaining"].add_metric(labels, snapshot.remaining)
            families["waiting"].add_metric(labels, waiting)
        yield from families.values()


class _TokenCollector(Collector):
    def __init__(self, sources: Callable[[], Iterable[TokenSource]],
                 monotonic: Callable[[], float],
                 authorisation_expiry: Callable[[str], float | None]) -> None:
        self._sources = sources
        self._monotonic = monotonic
        self._authorisation_expiry = authorisation_expiry

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "bol_proxy_token_expiry_seconds",
            "Seconds until the set's current token expires (0: no valid token)", labels=["set"],
        )
        authorisation = GaugeMetricFamily(
            "bol_proxy_authorization_expiry_timestamp_seconds",
            "Unix time at which a refresh-token set's authorisation by the seller ends",
            labels=["set"],
        )
        now = self._monotonic()
        for source in self._sources():
            token = source.current()
            left = max(0.0, token.expires_at - now) if token is not None else 0.0
            expiry.add_metric([source.cred.name], left)
            if source.cred.grant == "refresh_token":
                ends = self._authorisation_expiry(source.cred.name)
                if ends is not None:
                    authorisation.add_metric([source.cred.name], ends)
        yield expiry
        yield authorisation
