"""Prometheus metrics of one API process (scraped at GET /metrics), and the middleware that counts requests.

Request counts and latencies are labelled by route template (`/v1/feedback`, not the raw path), so
ids in paths cannot blow up the label set.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

registry = CollectorRegistry()

REQUESTS = Counter("chatloop_requests_total", "HTTP requests by route and status", ["route", "status"],
                   registry=registry)
ERRORS = Counter("chatloop_request_errors_total", "HTTP responses with status >= 400 by route", ["route"],
                 registry=registry)
LATENCY = Histogram("chatloop_request_seconds", "Time to the response headers, by route", ["route"],
                    registry=registry)
TTFT = Histogram("chatloop_time_to_first_token_seconds", "Request arrival to the first answer text",
                 buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 4, 8, 16), registry=registry)
TOKENS_PER_S = Histogram("chatloop_tokens_per_second", "Decode speed of one answer after its first token",
                         buckets=(1, 2, 5, 10, 20, 30, 40, 60, 80, 120, 200), registry=registry)
COMPLETION_TOKENS = Counter("chatloop_completion_tokens_total", "Tokens generated", registry=registry)
ACTIVE_STREAMS = Gauge("chatloop_active_streams", "Streaming responses in progress", registry=registry)
BATCH_SIZE = Gauge("chatloop_batch_size", "Sequences in the engine's running batches", registry=registry)
FEEDBACK = Counter("chatloop_feedback_events_total", "Feedback recorded by kind and outcome", ["kind", "status"],
                   registry=registry)
ADAPTER = Info("chatloop_production_adapter", "The adapter version this replica serves as production",
               registry=registry)
SWAPS = Gauge("chatloop_adapter_swaps", "Production adapter changes this replica has made", registry=registry)
ADAPTER_LOAD_FAILING = Gauge("chatloop_adapter_load_failing", "1 while this replica cannot load the registry's "
                             "production version and serves its last good one", registry=registry)
ADAPTER_LOAD_ATTEMPTS = Gauge("chatloop_adapter_load_failed_attempts", "Failed attempts in a row to load the "
                              "registry's production version (retried with backoff)", registry=registry)
TRAINING_OK = Gauge("chatloop_last_training_promoted", "1 if the last finished training run promoted its candidate",
                    registry=registry)
TRAINING_SECONDS = Gauge("chatloop_last_training_seconds", "Duration of the last finished training run",
                         registry=registry)


def route_of(scope: Scope) -> str:
    """The matched route's template; the router records the route in the scope as it dispatches."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                status, route = message["status"], route_of(scope)
                REQUESTS.labels(route, str(status)).inc()
                if status >= 400:
                    ERRORS.labels(route).inc()
                LATENCY.labels(route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observe)
