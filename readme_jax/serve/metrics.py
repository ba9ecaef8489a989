"""Prometheus metrics of the engine and the HTTP server, in one registry per app (tests start several): vLLM's
``vllm:`` series (what vLLM dashboards and autoscalers read, with their ``model_name`` label) beside our own
``readme_jax_`` series (Read-ME's expert statistics, the step time, HTTP requests).

    metrics = EngineMetrics(model_name="smollm2")   # a fresh CollectorRegistry
    engine = Engine(model, tokenizer, cfg, metrics=metrics)
    body = metrics.exposition()                     # what GET /metrics answers

The engine thread calls ``on_step``, ``on_first_token``, ``on_token``, ``on_finish`` and ``set_gauges`` (and
``on_scheduled`` with a request's queue time, where the engine reports it); the server calls ``on_request``
(HTTP), ``on_request_done`` (end-to-end latency) and, at scrape time, ``set_engine_stats`` with
``engine.stats()`` (KV-cache usage and prefix-cache counters, where the engine reports them).
prometheus_client metrics are thread-safe.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "readme_jax"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
EXPERT_BUCKETS = tuple(float(e) for e in range(0, 17))
#: The tokens-per-second gauge averages over this many seconds of steps.
RATE_WINDOW_S = 10.0
#: engine.stats() keys read at scrape time: KV-cache usage in [0, 1], cumulative prefix-cache token counters.
KV_USAGE_KEY, PREFIX_QUERIES_KEY, PREFIX_HITS_KEY = "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits"


class EngineMetrics:
    """vLLM's series: requests running / waiting, KV-cache usage, prefix-cache queries / hits, prompt and
    generation tokens, TTFT, inter-token latency (and its older name time_per_output_token), end-to-end
    latency, queue time, finished requests by reason. Ours: queue depth, active slots, tokens (counters and a
    tokens/s gauge), TTFT and per-token latency, step time, finished requests by reason, distinct experts per
    step (Read-ME only), KV cache usage, prefix cache queries and hits, preemptions (pushed by the engine with
    ``set_kv``; the vLLM KV series are read from ``engine.stats()`` at scrape time) and HTTP requests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None, *, model_name: str = "readme_jax"):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
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
        self._vllm(r)
        self._lock = threading.Lock()
        self._recent: collections.deque[tuple[float, float, int]] = collections.deque()   # (end, seconds, tokens)
        self._prefix_seen = {PREFIX_QUERIES_KEY: 0, PREFIX_HITS_KEY: 0}

    def _vllm(self, r: CollectorRegistry) -> None:
        m = ["model_name"]
        self.v_running = Gauge("vllm:num_requests_running", "Requests in model execution batches", m, registry=r)
        self.v_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed", m, registry=r)
        self.v_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = 100%)", m, registry=r)
        self.v_prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens", m, registry=r)
        self.v_prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens", m, registry=r)
        self.v_prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", m, registry=r)
        self.v_generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed", m, registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds", m,
                                buckets=TTFT_BUCKETS, registry=r)
        self.v_itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds", m,
                               buckets=TOKEN_BUCKETS, registry=r)
        self.v_tpot = Histogram("vllm:time_per_output_token_seconds",
                                "Time per output token in seconds (vLLM's older name of the inter-token latency)",
                                m, buckets=TOKEN_BUCKETS, registry=r)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds", m,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.v_queue = Histogram("vllm:request_queue_time_seconds", "Time a request spent waiting for a slot", m,
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.v_success = Counter("vllm:request_success", "Finished requests", m + ["finished_reason"], registry=r)

    def bind_model_name(self, name: str) -> None:
        """Label the vLLM series with ``name`` (the served model) and create them, so a scrape lists every series
        before the first request (finished_reason stop / length / abort / error)."""
        self.model_name = name
        for m in (self.v_running, self.v_waiting, self.v_kv_usage, self.v_prefix_queries, self.v_prefix_hits,
                  self.v_prompt_tokens, self.v_generation_tokens, self.v_ttft, self.v_itl, self.v_tpot, self.v_e2e,
                  self.v_queue):
            m.labels(name)
        for reason in ("stop", "length", "abort", "error"):
            self.v_success.labels(name, reason)

    # --- called by the engine thread ---
    def on_step(self, seconds: float, decode_tokens: int, prefill_tokens: int, distinct_experts: int | None) -> None:
        self.step_time.observe(seconds)
        self.generation_tokens.inc(decode_tokens)
        self.prompt_tokens.inc(prefill_tokens)
        self.v_prompt_tokens.labels(self.model_name).inc(prefill_tokens)
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
        self.v_ttft.labels(self.model_name).observe(ttft_seconds)
        self.v_generation_tokens.labels(self.model_name).inc()

    def on_token(self, inter_token_seconds: float) -> None:
        self.inter_token.observe(inter_token_seconds)
        self.v_itl.labels(self.model_name).observe(inter_token_seconds)
        self.v_tpot.labels(self.model_name).observe(inter_token_seconds)
        self.v_generation_tokens.labels(self.model_name).inc()

    def on_scheduled(self, queue_seconds: float) -> None:
        """A request got its slot ``queue_seconds`` after it arrived."""
        self.v_queue.labels(self.model_name).observe(queue_seconds)

    def on_finish(self, completion_tokens: int, finish_reason: str) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()
        self.completion_tokens.inc(completion_tokens)
        self.v_success.labels(self.model_name, finish_reason).inc()

    def set_gauges(self, queue_depth: int, active_slots: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active_slots.set(active_slots)
        self.v_waiting.labels(self.model_name).set(queue_depth)
        self.v_running.labels(self.model_name).set(active_slots)

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

    def on_request_done(self, e2e_seconds: float) -> None:
        """A generation request (one choice) finished ``e2e_seconds`` after the server received it."""
        self.v_e2e.labels(self.model_name).observe(e2e_seconds)

    def set_engine_stats(self, stats: dict) -> None:
        """Copy what ``engine.stats()`` reports of the KV and prefix caches (keys absent: series left as they are)."""
        if stats.get(KV_USAGE_KEY) is not None:
            self.v_kv_usage.labels(self.model_name).set(float(stats[KV_USAGE_KEY]))
        with self._lock:
            for key, counter in ((PREFIX_QUERIES_KEY, self.v_prefix_queries), (PREFIX_HITS_KEY, self.v_prefix_hits)):
                total = stats.get(key)
                if total is not None and int(total) > self._prefix_seen[key]:
                    counter.labels(self.model_name).inc(int(total) - self._prefix_seen[key])
                    self._prefix_seen[key] = int(total)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
