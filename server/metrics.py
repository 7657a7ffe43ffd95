"""Prometheus metrics of the server (its own registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Counter("fedattn_sessions", "Sessions by outcome", ["outcome"], registry=self.registry)
        self.kv_bytes = Counter("fedattn_kv_bytes", "K/V bytes exchanged between participants", ["direction"],
                                registry=self.registry)
        self.ttft = Histogram("fedattn_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.queue_depth = Gauge("fedattn_queue_depth", "Sessions waiting to enter the engine", registry=self.registry)

    def session_finished(self, result, timings) -> None:
        """Called by the engine thread when a session ends (completed, failed or cancelled)."""
        outcome = "completed" if result.error is None else ("cancelled" if result.error == "cancelled" else "failed")
        self.sessions.labels(outcome).inc()
        self.kv_bytes.labels("published").inc(sum(result.cost.published_bytes))
        self.kv_bytes.labels("received").inc(sum(result.cost.received_bytes))
        if timings.first_token_s is not None:
            self.ttft.observe(timings.first_token_s)
