"""Prometheus metrics of the server (its own registry, served at /metrics), every one labelled `model_name`.

Named after vLLM's (`vllm:prompt_tokens_total` -> `fedattn_prompt_tokens_total`, ...), plus FedAttn's own:
sessions by outcome and K/V bytes exchanged.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        model, registry = ["model_name"], self.registry
        self.sessions = Counter("fedattn_sessions", "Sessions by outcome", [*model, "outcome"], registry=registry)
        self.kv_bytes = Counter("fedattn_kv_bytes", "K/V bytes exchanged between participants", [*model, "direction"],
                                registry=registry)
        self.rejected = Counter("fedattn_requests_rejected", "Requests answered with an error, by HTTP status "
                                "(4xx and 503; an unhandled 500 is logged, not counted)",
                                [*model, "status"], registry=registry)
        self.prompt_tokens = Counter("fedattn_prompt_tokens", "Prompt tokens computed (every participant's segment "
                                     "and the public prefix)", model, registry=registry).labels(model_name)
        self.generation_tokens = Counter("fedattn_generation_tokens", "Tokens generated", model,
                                         registry=registry).labels(model_name)
        self.ttft = Histogram("fedattn_time_to_first_token_seconds", "Time to the first generated token (federated: "
                              "as its engine reports it)", model, buckets=LATENCY_BUCKETS,
                              registry=registry).labels(model_name)
        self.e2e = Histogram("fedattn_e2e_request_latency_seconds", "Time from submission to the session's end", model,
                             buckets=LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.running = Gauge("fedattn_num_requests_running", "Sessions in the engine(s)", model,
                             registry=registry).labels(model_name)
        self.waiting = Gauge("fedattn_num_requests_waiting", "Sessions waiting to enter the engine", model,
                             registry=registry).labels(model_name)

    def session_finished(self, result, timings) -> None:
        """Called by the engine thread when a session ends (completed, failed or cancelled)."""
        outcome = "completed" if result.error is None else ("cancelled" if result.error == "cancelled" else "failed")
        self.sessions.labels(self.model_name, outcome).inc()
        self.kv_bytes.labels(self.model_name, "published").inc(sum(result.cost.published_bytes))
        self.kv_bytes.labels(self.model_name, "received").inc(sum(result.cost.received_bytes))
        self.prompt_tokens.inc(result.cost.prefix_tokens + sum(result.cost.tokens))
        self.generation_tokens.inc(sum(len(out.token_ids) for out in result.outputs.values()))
        self.e2e.observe(timings.total_s)
        if timings.first_token_s is not None:
            self.ttft.observe(timings.first_token_s)


class CountRejections:
    """ASGI middleware: every response with status >= 400 counted by status (the guard's 401/413 included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.rejected.labels(self.metrics.model_name, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
