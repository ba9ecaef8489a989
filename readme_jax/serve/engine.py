"""The continuous-batching engine: a bounded request queue, paged KV with prefix caching, one packed step.

    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=8, max_num_batched_tokens=256))
    engine.start()                                         # compile every bucket, then start the thread
    stream = engine.submit(prompt_ids, SamplingParams(max_tokens=32))
    text = "".join(out.text for out in stream)
    engine.shutdown(drain_timeout=30)

Each step: take new requests from the bounded inbox (they wait in ``serve/queue_state.py``'s queue), drop cancelled
ones (their pages are freed now), ask the scheduler for this step's work within the token budget (``serve/api.py:
Scheduler``; new prompts are admissible only while their pages fit: ``serve/kv_pages.py``), give every picked decode
token its page (preempting, when none is free, the sequence of the highest priority value, then the latest-arrived:
its pages are freed and it is recomputed later), open the admitted prompts' pages (a cached prefix is taken, not
prefilled; Read-ME routes the rest of the prompt here, writing the router's KV into the same pages), and run every
decode token and prompt chunk of the step as one packed ``runner.step`` (``serve/paged_runner.py``). Then release
each request's new text (incremental detokenisation, stop strings that may span steps) and cache the pages its step
filled. A request ends on EOS or a stop token ("stop"), a stop string ("stop"), ``max_tokens`` or the context
("length"), cancellation or shutdown ("abort"). If the step fails, every in-flight request gets a final output with
finish_reason "error" and the engine stays unhealthy.

A preempted request keeps its tokens: it comes back as a prompt of its prompt and all but its last generated
token (prefilled without sampling; the last one is its pending decode token), so it produces the tokens it
would have produced unpreempted. With ``expert_slots`` (Read-ME, k resident experts per layer) a step runs in
passes of at most k experts (``engine_step.run_rows``); every pass reads experts only from the resident pool.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from typing import Callable, Sequence

import numpy as np

from readme_jax.errors import EngineError, NotReadyError, QueueFullError, SamplingError
from readme_jax.model.protocol import arch_config, is_routed
from readme_jax.sampling import SamplingParams
from readme_jax.serve.api import RequestOutput, RequestStream, WaitingPrefill, check_priority
from readme_jax.serve.detok import IncrementalDetokenizer, StopStrings
from readme_jax.serve.engine_config import EngineConfig, page_bytes_of
from readme_jax.serve.engine_pages import PagedScheduling
from readme_jax.serve.engine_request import EngineRequest
from readme_jax.serve.engine_step import Row, run_rows
from readme_jax.serve.expert_cache import ExpertCache, make_policy
from readme_jax.serve.kv_pages import KVPages
from readme_jax.serve.queue_state import QueueState
from readme_jax.serve.paged_runner import PagedRunner
from readme_jax.serve.schedulers import make_scheduler

log = logging.getLogger(__name__)

class Engine(PagedScheduling):
    """See the module docstring. Thread-safe ``submit``; everything else runs on the engine thread."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), *, metrics=None,
                 fault_hook: Callable[[int], None] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.fault_hook = fault_hook
        num_pages = config.num_pages(page_bytes_of(model, config.page_size))
        self.runner = PagedRunner(model, num_pages=num_pages, page_size=config.page_size,
                                  max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=config.max_model_len, expert_slots=config.expert_slots,
                                  mesh=config.mesh, min_token_bucket=config.min_token_bucket,
                                  dispatcher=config.dispatcher)
        self.pages = KVPages(num_pages, config.page_size, prefix_caching=config.prefix_caching)
        self.lookahead = 1 if is_routed(model) else 0   # Read-ME: the router's entry of the sampled token
        self.sliding_window = arch_config(model).sliding_window
        self.cache = None
        if self.runner.pool is not None:
            pool = self.runner.pool
            policy = make_policy(config.expert_policy, **dict(config.expert_policy_options))
            self.cache = ExpertCache(pool.capacity, policy, num_layers=pool.num_layers,
                                     expert_bytes=pool.expert_bytes / pool.num_layers)
        self.scheduler = make_scheduler(config.scheduler, **dict(config.scheduler_options))
        self.vocab_size = arch_config(model).vocab_size
        self.eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        self._inbox: queue.Queue[EngineRequest] = queue.Queue()
        self._queued = 0                                # requests without a slot (inbox + waiting); <= max_queue
        self._queue = QueueState(config.max_num_seqs, self.runner.token_buckets)   # serve/queue_state.py
        self._reqs: dict[str, EngineRequest] = {}      # every request in the queue, by id
        self._held: list[EngineRequest] = []           # in _reqs, not yet waiting: their sibling is prefilling
        self._ids = itertools.count()
        self._seeds = random.Random(0)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self.step_count = 0
        self.preemptions = 0
        self._preempted: list[str] = []                # ids preempted in the current step
        self.ready = False
        self.error: str | None = None
        self.step_log: list[dict] = []                 # bounded: last STEP_LOG entries (benchmarks read it)

    STEP_LOG = 4096

    # --- public -------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive() or self._stop)

    def start(self, *, warmup: bool = True) -> None:
        """Compile every bucket (so no request pays a compile), then start the engine thread."""
        if warmup:
            self.warmup()
        self._thread = threading.Thread(target=self._loop, name="readme-jax-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def warmup(self) -> None:
        self.runner.warmup()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, loop=None,
               request_id: str | None = None, follows: str | None = None, priority: int = 0) -> RequestStream:
        """Queue one request. Raises SamplingError (bad prompt / lengths / priority, naming the field),
        QueueFullError (``max_queue`` requests already wait beyond the free slots), NotReadyError (not started,
        draining) or EngineError (the engine failed). ``follows``: the id of a request with the same prompt (the
        first sample of an n > 1 request): this one waits until that one's prompt is prefilled, then takes its
        full pages from the prefix cache instead of prefilling them again. ``priority``: vLLM's (an integer, lower
        first): it orders admission and decodes in every scheduler and picks preemption victims (highest first)."""
        if self.error is not None:
            raise EngineError(f"engine failed: {self.error}")
        if not self.ready or self._draining:
            raise NotReadyError("engine is not accepting requests")
        params = params or SamplingParams(max_tokens=self.config.default_max_tokens)
        prompt = [int(t) for t in prompt_ids]
        L = self.config.max_model_len
        if not prompt:
            raise SamplingError("prompt", "expected at least one token")
        if any(t < 0 or t >= self.vocab_size for t in prompt):
            raise SamplingError("prompt", f"token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= L:
            raise SamplingError("prompt", f"{len(prompt)} tokens; the context is {L} tokens (max_model_len)")
        priority = check_priority(priority)
        if len(prompt) + params.max_tokens > L:
            raise SamplingError("max_tokens", f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} "
                                              f"exceeds the context of {L} tokens")
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else self._seeds.randrange(2**31 - 1)
        stream = RequestStream(rid, len(prompt), loop=loop)
        req = EngineRequest(id=rid, prompt=prompt, params=params, seed=seed, stream=stream,
                            arrival_time=time.perf_counter(), priority=priority, follows=follows)
        with self._lock:         # bounded: requests without a slot (inbox + waiting) beyond those a free slot takes
            if self._queued >= self.config.max_queue + len(self._queue.free):
                raise QueueFullError(f"request queue is full ({self.config.max_queue} waiting for a slot)")
            self._queued += 1
            self._inbox.put_nowait(req)
        self._wake.set()
        return stream

    def stats(self) -> dict:
        return {"queue_depth": self._queued, "active_slots": self._queue.busy_slots,
                "max_num_seqs": self.config.max_num_seqs, "steps": self.step_count, "healthy": self.healthy,
                "ready": self.ready, "kv_cache_usage": self.pages.usage, "preemptions": self.preemptions,
                "prefix_cache_queries": self.pages.stats.queries, "prefix_cache_hits": self.pages.stats.hits}

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting; let in-flight requests finish for up to ``drain_timeout`` s; abort the rest."""
        self._draining = True
        self.ready = False
        deadline = time.monotonic() + drain_timeout
        while self._busy() and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for req in self._all_requests():
            self._finish(req, "abort")

    # --- engine thread ------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._reqs or not self._inbox.empty())

    def _dequeue(self, n: int = -1) -> None:
        with self._lock:
            self._queued += n

    def _all_requests(self) -> list[EngineRequest]:
        reqs = list(self._reqs.values())
        while True:
            try:
                reqs.append(self._inbox.get_nowait())
            except queue.Empty:
                return reqs

    def _loop(self) -> None:
        try:
            while not self._stop:
                if not self._busy():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if self.fault_hook is not None:
                    self.fault_hook(self.step_count)
                self._step()
        except Exception as e:                                     # noqa: BLE001 - report, then stay down
            log.exception("engine step failed")
            self.error = f"{type(e).__name__}: {e}"
            self.ready = False
            for req in self._all_requests():
                self._finish(req, "error")

    def _admit(self, arrivals: list[list]) -> None:
        for req in [r for r in self._held if not self._leader_prefilling(r)]:    # its sibling's pages are cached
            self._held.remove(req)
            if not req.closed:
                self._wait(req)
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            req.arrival_step = self.step_count
            req.tokens, req.target = list(req.prompt), len(req.prompt)
            req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt) if self.tokenizer is not None else None
            req.stops = StopStrings(req.params.stop)
            self._reqs[req.id] = req
            if self._leader_prefilling(req):
                self._held.append(req)
            else:
                self._wait(req)
            arrivals.append([req.id, len(req.prompt)])

    def _wait(self, req: EngineRequest) -> None:
        """Into the queue as a prompt of ``req.target`` tokens (expert ids known once its pages open)."""
        self._queue.arrive(WaitingPrefill(req.id, req.arrival_step, np.full(req.target, -1, np.int32),
                                          priority=req.priority))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._reqs.values() if r.stream.cancelled]:
            self._finish(req, "abort")

    def _step(self) -> None:
        t0 = time.perf_counter()
        arrivals: list[list] = []
        self._admit(arrivals)
        self._drop_cancelled()
        if self.config.prefix_caching:               # the scheduler sees what a new prompt has left to prefill
            for w in self._queue.waiting.values():
                if w.slot is None:
                    req = self._reqs[w.request_id]
                    if req.keys is None:         # a request that may not read the cache takes no hit
                        req.keys = self.pages.prefix_keys(req.tokens[:req.target]) if req.reads_cache else []
                    w.done = self.pages.cached_tokens(req.keys)
        self._preempted = []
        pick = self._schedule()
        preempted = self._preempted
        before = self._queue.clone() if self.cache is not None else None     # the expert cache's prediction
        experts = [self._queue.running[s].expert for s in pick.decodes]       # in pick order, as adv.decoded
        adv = self._queue.apply(pick)
        rows = []
        for c in adv.chunks:
            req = self._reqs[c.request_id]
            if req.slot is None:                     # the prompt's first chunk took a slot
                req.slot = c.slot
                self._dequeue()
                if req.device_row:                   # its penalty counts and logit_bias start afresh
                    bias = req.params.logit_bias
                    self.runner.reset_row(req.slot, [t for t, _ in bias], [v for _, v in bias])
            have = len(req.prompt_lps)                 # prompt logprobs wanted from this chunk on (echo)
            want_prompt = req.params.prompt_logprobs is not None and c.start <= have < min(c.start + c.n,
                                                                                          len(req.prompt) - 1)
            rows.append(self._row(req, c.start, c.n, c.last and not req.generated, want_prompt))
        for _, rid in adv.decoded:
            req = self._reqs[rid]
            rows.append(self._row(req, req.computed, 1, True, False))
        out = run_rows(self.runner, rows, self.pages.table, bool(self.lookahead), self.cache,
                       lambda: before.future(self.scheduler, pick, self.config.max_num_batched_tokens,
                                             self.config.belady_window)) if rows else []
        for row, res in zip(rows, out):
            req, tok, nxt = self._reqs[row.request_id], res.token, res.expert
            if res.prompt is not None:
                have = len(req.prompt_lps)
                req.prompt_lps += res.prompt[have - row.start:][:len(req.prompt) - 1 - have]
            req.computed = row.start + row.n
            self.pages.commit(req.id, req.tokens[:req.computed], req.experts[:req.computed] if self.lookahead else None)
            if self.sliding_window is not None and not self.lookahead:
                self.pages.slide(req.id, req.computed + 1 - self.sliding_window)
            if row.sample:
                self._emit(req, tok, nxt, res.logprob)
            elif req.computed == req.target and req.generated:     # recomputed: its pending token waits again
                self._queue.ready(req.slot, req.id, req.arrival_step, req.experts[len(req.tokens) - 1], req.priority)
        self.step_count += 1
        seconds = time.perf_counter() - t0
        prefill_tokens = sum(c.n for c in adv.chunks)
        distinct = len({e for e in experts if e >= 0}) if self.lookahead and experts else None
        entry = {"step": self.step_count, "seconds": seconds, "decode_tokens": len(adv.decoded),
                 "prefill_tokens": prefill_tokens, "distinct_experts": distinct, "decode_experts": experts,
                 "decode_requests": [rid for _, rid in adv.decoded], "arrivals": arrivals,
                 "prefills": [list(p) for p in pick.prefills], "decodes": list(pick.decodes),
                 "preempted": preempted, "kv_cache_usage": self.pages.usage}
        self.step_log.append(entry)
        if len(self.step_log) > self.STEP_LOG:
            del self.step_log[: len(self.step_log) - self.STEP_LOG]
        if self.metrics is not None:
            self.metrics.on_step(seconds, len(adv.decoded), prefill_tokens, distinct)
            self.metrics.set_gauges(self._queued, self._queue.busy_slots)
            self.metrics.set_kv(self.pages.usage, self.pages.stats.queries, self.pages.stats.hits, self.preemptions)

    def _row(self, req: EngineRequest, start: int, n: int, sample: bool, prompt_logprobs: bool) -> Row:
        p = req.params
        return Row(req.id, req.tokens, req.experts, start, n, sample, req.seed, p.temperature, p.top_p, params=p,
                   proc_row=req.slot if req.device_row else -1, prompt_len=len(req.prompt),
                   prompt_logprobs=prompt_logprobs)

    def _emit(self, req: EngineRequest, tok: int, nxt: int, logprob=None) -> None:
        """A token was sampled for ``req``: release its text, decide whether the request ends."""
        now = time.perf_counter()
        if self.metrics is not None:
            if req.last_token_time is None:
                self.metrics.on_first_token(now - req.arrival_time)
            else:
                self.metrics.on_token(now - req.last_token_time)
        req.last_token_time = now
        req.generated.append(tok)
        req.tokens.append(tok)
        req.experts.append(nxt)
        p = req.params
        text, reason, hit = "", None, False
        if (tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"                                  # a stop token: counted, never shown as text
        elif req.detok is not None:
            text, hit = req.stops.feed(req.detok.add(tok))
            reason = "stop" if hit else None
        if reason is None and (len(req.generated) >= p.max_tokens
                               or len(req.prompt) + len(req.generated) >= self.config.max_model_len):
            reason = "length"
        lps = [logprob] if p.logprobs is not None else None
        first = ([None] + req.prompt_lps) if p.prompt_logprobs is not None and len(req.generated) == 1 else None
        if reason is None:
            self._queue.ready(req.slot, req.id, req.arrival_step, nxt, req.priority)
            req.stream.put(RequestOutput(req.id, [tok], text, prompt_tokens=len(req.prompt),
                                         completion_tokens=len(req.generated), logprobs=lps, prompt_logprobs=first))
            return
        if not hit and req.detok is not None:                # release what was held back
            held, hit = req.stops.feed(req.detok.flush())
            text += held + ("" if hit else req.stops.flush())
        self._finish(req, reason, last_tokens=[tok], text=text, logprobs=lps, prompt_logprobs=first)

    def _finish(self, req: EngineRequest, reason: str, *, last_tokens: list[int] | None = None, text: str = "",
                logprobs: list | None = None, prompt_logprobs: list | None = None) -> None:
        if req.closed:
            return
        if req.slot is None:
            self._dequeue()
        if self._reqs.pop(req.id, None) is req:
            self._queue.remove(req.id, req.slot)
            if req.id in self.pages.tables:
                self.pages.close(req.id)
        req.closed = True
        req.stream.put(RequestOutput(req.id, last_tokens or [], text, finished=True, finish_reason=reason,
                                     prompt_tokens=len(req.prompt), completion_tokens=len(req.generated),
                                     error=self.error if reason == "error" else None,
                                     logprobs=logprobs if logprobs is not None else
                                     ([] if req.params.logprobs is not None else None),
                                     prompt_logprobs=prompt_logprobs))
        if self.metrics is not None:
            self.metrics.on_finish(len(req.generated), reason)
