"""Prometheus metrics of the engine and the HTTP server, in one registry per app (tests start several).

    metrics = EngineMetrics()                       # a fresh CollectorRegistry
    engine = Engine(model, tokenizer, cfg, metrics=metrics)
    body = metrics.exposition()                     # what GET /metrics answers

The engine thread calls ``on_step``, ``on_first_token``, ``on_token``, ``on_finish`` and ``set_gauges``;
the server counts HTTP requests with ``on_request``. prometheus_client metrics are thread-safe.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "readme_jax"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
EXPERT_BUCKETS = tuple(float(e) for e in range(0, 17))
#: The tokens-per-second gauge averages over this many seconds of steps.
RATE_WINDOW_S = 10.0


class EngineMetrics:
    """Queue depth, active slots, tokens (counters and a tokens/s gauge), TTFT and per-token latency, step
    time, finished requests by reason, distinct experts per step (Read-ME only), KV cache usage, prefix cache
    queries and hits, preemptions, and HTTP requests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge(f"{PREFIX}_active_slots", "Slots holding a request", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens decoded", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.tokens_per_second = Gauge(f"{PREFIX}_generation_tokens_per_second",
                                       f"Decoded tokens per second over the last {RATE_WINDOW_S:g} s of steps",
                                       registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between a request's tokens",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.step_time = Histogram(f"{PREFIX}_step_seconds", "Engine step wall time", buckets=STEP_BUCKETS,
                                   registry=r)
        self.distinct_experts = Histogram(f"{PREFIX}_distinct_experts_per_step",
                                          "Distinct experts among one step's tokens (Read-ME models)",
                                          buckets=EXPERT_BUCKETS, registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens of finished requests",
                                         registry=r)
        self.kv_cache_usage = Gauge(f"{PREFIX}_kv_cache_usage_perc", "Fraction of KV pages held by sequences",
                                    registry=r)
        self.prefix_cache_queries = Counter(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache", registry=r)
        self.prefix_cache_hits = Counter(f"{PREFIX}_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         registry=r)
        self.preemptions = Counter(f"{PREFIX}_num_preemptions", "Sequences preempted (pages freed, recomputed)",
                                   registry=r)
        self._kv_totals = (0, 0, 0)
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered", ["route", "status"],
                                     registry=r)
        self._lock = threading.Lock()
        self._recent: collections.deque[tuple[float, float, int]] = collections.deque()   # (end, seconds, tokens)

    # --- called by the engine thread ---
    def on_step(self, seconds: float, decode_tokens: int, prefill_tokens: int, distinct_experts: int | None) -> None:
        self.step_time.observe(seconds)
        self.generation_tokens.inc(decode_tokens)
        self.prompt_tokens.inc(prefill_tokens)
        if distinct_experts is not None:
            self.distinct_experts.observe(distinct_experts)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, seconds, decode_tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            span = now - self._recent[0][0] + self._recent[0][1]
            tokens = sum(t for _, _, t in self._recent)
        self.tokens_per_second.set(tokens / span if span > 0 else 0.0)

    def on_first_token(self, ttft_seconds: float) -> None:
        self.ttft.observe(ttft_seconds)

    def on_token(self, inter_token_seconds: float) -> None:
        self.inter_token.observe(inter_token_seconds)

    def on_finish(self, completion_tokens: int, finish_reason: str) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()
        self.completion_tokens.inc(completion_tokens)

    def set_gauges(self, queue_depth: int, active_slots: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active_slots.set(active_slots)

    def set_kv(self, usage: float, queries: int, hits: int, preemptions: int) -> None:
        """KV usage now and the engine's running totals of prefix-cache queries / hits and preemptions."""
        self.kv_cache_usage.set(usage)
        for counter, total, seen in zip((self.prefix_cache_queries, self.prefix_cache_hits, self.preemptions),
                                        (queries, hits, preemptions), self._kv_totals):
            counter.inc(total - seen)
        self._kv_totals = (queries, hits, preemptions)

    # --- called by the server ---
    def on_request(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
