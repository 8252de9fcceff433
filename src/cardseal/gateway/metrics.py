"""Prometheus metrics of one gateway process (or, with PROMETHEUS_MULTIPROC_DIR, of all its
workers). Labels carry codes and routes only, never request data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cardseal.envelope import EnvelopeOpener
from cardseal.keys.base import KeyProviders

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _KeyCollector(Collector):
    """KMS calls and data-key cache hits, read from the live objects at scrape time."""

    def __init__(self, providers: KeyProviders, envelope: EnvelopeOpener) -> None:
        self._providers = providers
        self._envelope = envelope

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily("cardseal_kms_calls", "KMS calls by operation",
                                    labels=["operation"])
        for operation, count in sorted(self._providers.calls.items()):
            calls.add_metric([operation], count)
        yield calls
        cache = CounterMetricFamily("cardseal_data_key_cache", "Data-key cache lookups",
                                    labels=["result"])
        cache.add_metric(["hit"], self._envelope.cache_hits)
        cache.add_metric(["miss"], self._envelope.cache_misses)
        yield cache


class Metrics:
    def __init__(self, providers: KeyProviders, envelope: EnvelopeOpener) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cardseal_http_requests", "HTTP requests",
                                ["route", "method", "status"], registry=self.registry)
        self.outcomes = Counter("cardseal_payment_outcomes", "Payment requests by outcome code",
                                ["code"], registry=self.registry)
        self.latency = Histogram("cardseal_http_request_duration_seconds", "Request latency",
                                 ["route"], buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_KeyCollector(providers, envelope))

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
