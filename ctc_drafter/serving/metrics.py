"""GET /metrics in the Prometheus text format: requests, tokens, steps, accepted tokens per step, queue.

Each server has its own registry (not prometheus_client's global one), so several apps can live in
one process (tests) without clashing names.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..decoding import GenerationResult

# Outcomes of a request: answered, refused with 429 (queue full), refused as invalid (4xx),
# client gone before the end, or a server error.
OUTCOMES = ("ok", "rejected", "invalid", "cancelled", "error")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ctc_drafter_requests", "Requests by endpoint and outcome (ok, rejected = 429, "
                                "invalid = other 4xx, cancelled = client left, error)", ["endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("ctc_drafter_prompt_tokens", "Prompt tokens of decoded requests", registry=r)
        self.completion_tokens = Counter("ctc_drafter_completion_tokens", "Tokens generated", registry=r)
        self.steps = Counter("ctc_drafter_steps", "Base-model forward passes (prefill included)", registry=r)
        self.accept_length = Histogram("ctc_drafter_accept_length", "Tokens emitted per base forward pass",
                                       buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16), registry=r)
        self.time_to_first_token = Histogram("ctc_drafter_time_to_first_token_seconds",
                                             "From arrival (queueing included) to the first text sent",
                                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.tokens_per_s = Histogram("ctc_drafter_request_tokens_per_second",
                                      "Decoding speed of each request (prefill included)",
                                      buckets=(1, 2, 5, 10, 15, 20, 30, 50, 100, 200, 500), registry=r)
        self.queue_depth = Gauge("ctc_drafter_queue_depth", "Requests waiting for the decoding worker", registry=r)
        self.busy = Gauge("ctc_drafter_busy", "1 while a request is being decoded", registry=r)

    def track(self, queue_depth: Callable[[], int], busy: Callable[[], bool]) -> None:
        """Read the queue's state when scraped rather than updating gauges on every change."""
        self.queue_depth.set_function(queue_depth)
        self.busy.set_function(lambda: float(busy()))

    def count(self, endpoint: str, outcome: str) -> None:
        assert outcome in OUTCOMES, outcome
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def observe_decoding(self, prompt_tokens: int, res: GenerationResult) -> None:
        """The work of one generate call, finished or cut short."""
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(res.new_tokens)
        self.steps.inc(res.steps)
        for n in res.accept_lengths:
            self.accept_length.observe(n)
        if res.wall_s > 0:
            self.tokens_per_s.observe(res.tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
