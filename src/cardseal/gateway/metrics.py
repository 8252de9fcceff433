"""Prometheus metrics of the gateway. Labels carry codes, routes and operations only.

With several workers (``cardseal serve --workers N``) the server sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start; every counter and histogram then lives in
files there and ``/metrics`` on any worker reports the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from cardseal.envelope import EnvelopeOpener
from cardseal.keys.base import KeyProviders

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, providers: KeyProviders, envelope: EnvelopeOpener) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cardseal_http_requests", "HTTP requests",
                                ["route", "method", "status"], registry=self.registry)
        self.outcomes = Counter("cardseal_payment_outcomes", "Payment requests by outcome code",
                                ["code"], registry=self.registry)
        self.latency = Histogram("cardseal_http_request_duration_seconds", "Request latency",
                                 ["route"], buckets=_BUCKETS, registry=self.registry)
        self.kms_calls = Counter("cardseal_kms_calls", "KMS calls by operation",
                                 ["operation"], registry=self.registry)
        self.cache = Counter("cardseal_data_key_cache", "Unwrapped data-key cache lookups",
                             ["result"], registry=self.registry)
        for operation in ("encrypt", "decrypt", "generate_data_key"):
            self.kms_calls.labels(operation)
        hit, miss = self.cache.labels("hit"), self.cache.labels("miss")
        providers.observers.append(lambda operation: self.kms_calls.labels(operation).inc())
        envelope.observers.append(lambda was_hit: (hit if was_hit else miss).inc())

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
