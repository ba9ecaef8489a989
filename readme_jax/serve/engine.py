"""The continuous-batching engine: a bounded request queue, fixed slots, a scheduler, one thread.

    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=8, max_num_batched_tokens=256))
    engine.start()                                         # compile every bucket, then start the thread
    stream = engine.submit(prompt_ids, SamplingParams(max_tokens=32))
    text = "".join(out.text for out in stream)
    engine.shutdown(drain_timeout=30)

Each step: take new requests from the bounded inbox and route their prompts (lookahead: every waiting
token's expert is known before the backbone runs), drop cancelled requests (their slots are freed now),
ask the scheduler for this step's work within the token budget (``serve/api.py: Scheduler``), run the
prefill chunks (a prompt longer than the budget is prefilled in ordered chunks), then one decode step over
the picked slots, and release each request's new text (incremental detokenisation, stop strings that may
span steps). A request ends on EOS or a stop token ("stop"), a stop string ("stop"), ``max_tokens`` or the
context ("length"), cancellation or shutdown ("abort"). If the step fails, every in-flight request gets a
final output with finish_reason "error" and the engine stays unhealthy.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from readme_jax.errors import EngineError, NotReadyError, QueueFullError, SamplingError
from readme_jax.model.dispatch import Dispatcher
from readme_jax.model.protocol import arch_config
from readme_jax.sampling import SamplingParams
from readme_jax.serve.api import RequestOutput, RequestStream, RunningDecode, WaitingPrefill
from readme_jax.serve.detok import IncrementalDetokenizer, StopStrings
from readme_jax.serve.expert_cache import ExpertCache, LazyFuture, WindowFuture, make_policy
from readme_jax.serve.runner import ModelRunner
from readme_jax.serve.schedulers import make_scheduler
from readme_jax.serve.simulate import predict_future

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_num_seqs: slots (sequences decoding at once); max_num_batched_tokens: the per-step token budget
    (decode tokens + prefill tokens); max_model_len: prompt + output tokens per sequence (the cache length);
    max_queue: requests waiting for a slot before submit raises QueueFullError; default_max_tokens: used
    when a request names none; scheduler: a name of ``serve.schedulers.make_scheduler`` with its options."""

    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256
    max_model_len: int = 2048
    max_queue: int = 64
    default_max_tokens: int = 16
    scheduler: str = "decode-first"
    scheduler_options: tuple[tuple[str, object], ...] = ()
    min_prefill_bucket: int = 16
    expert_slots: int | None = None      # Read-ME: k resident experts per layer for decode (None: all E)
    expert_policy: str = "belady"        # serve.expert_cache.POLICIES name, with its options
    expert_policy_options: tuple[tuple[str, object], ...] = ()
    belady_window: int = 8               # steps of predicted future the windowed Belady policy sees
    mesh: jax.sharding.Mesh | None = None  # parallel.mesh.make_mesh: params, caches sharded (runner.py); None: 1 device
    dispatcher: Dispatcher | None = None   # Read-ME decode steps' dispatcher (model.dispatch.DISPATCHERS); None: default

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_queue",
                     "default_max_tokens", "min_prefill_bucket"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name}: expected an integer >= 1, got {v!r}")

    def prefill_buckets(self) -> tuple[int, ...]:
        """Chunk sizes: powers of two from min_prefill_bucket up to the budget (and the budget itself)."""
        sizes, b = [], self.min_prefill_bucket
        while b < self.max_num_batched_tokens:
            sizes.append(b)
            b *= 2
        return tuple(sizes) + (self.max_num_batched_tokens,)


@dataclasses.dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    stream: RequestStream
    arrival_time: float
    arrival_step: int = 0
    experts: np.ndarray | None = None     # [prompt tokens]
    slot: int | None = None
    done: int = 0                          # prompt tokens prefilled
    generated: list[int] = dataclasses.field(default_factory=list)
    pending: int | None = None             # sampled, not yet run through the backbone
    pending_expert: int = -1
    waited: int = 0
    last_token_time: float | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    closed: bool = False                   # the final output was sent


class Engine:
    """See the module docstring. Thread-safe ``submit``; everything else runs on the engine thread."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), *, metrics=None,
                 fault_hook: Callable[[int], None] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.fault_hook = fault_hook
        self.runner = ModelRunner(model, num_slots=config.max_num_seqs, max_len=config.max_model_len,
                                  prefill_buckets=config.prefill_buckets(), expert_slots=config.expert_slots,
                                  mesh=config.mesh, dispatcher=config.dispatcher)
        self.cache = None
        if self.runner.pool is not None:
            pool = self.runner.pool
            policy = make_policy(config.expert_policy, **dict(config.expert_policy_options))
            self.cache = ExpertCache(pool.capacity, policy, num_layers=pool.num_layers,
                                     expert_bytes=pool.expert_bytes / pool.num_layers)
        self.scheduler = make_scheduler(config.scheduler, **dict(config.scheduler_options))
        self.vocab_size = arch_config(model).vocab_size
        self.eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._queued = 0                                # requests without a slot (inbox + waiting); <= max_queue
        self._waiting: list[_Request] = []             # routed, not fully prefilled
        self._running: dict[int, _Request] = {}        # slot -> request
        self._free = list(range(config.max_num_seqs))
        self._ids = itertools.count()
        self._seeds = random.Random(0)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self.step_count = 0
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
        r = self.runner
        for T in r.prefill_buckets:
            r.prefill(r.scratch, [0] * T, np.full(T, -1, np.int32), True, 0, 0.0, 1.0)
        for M in r.decode_buckets:                    # gathered buckets, and (most slots) every row at once
            if 2 * M <= r.num_slots:
                r.decode([r.scratch] * M, [0] * M, [-1] * M, [0] * M, [0.0] * M, [1.0] * M)
        n = r.num_slots
        r.decode(list(range(n)), [0] * n, [-1] * n, [0] * n, [0.0] * n, [1.0] * n)
        for s in range(n):
            r.free(s)
        for T in r.route_buckets:
            r.route_prompt([0] * T)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, loop=None,
               request_id: str | None = None) -> RequestStream:
        """Queue one request. Raises SamplingError (bad prompt / lengths, naming the field), QueueFullError,
        NotReadyError (not started, draining) or EngineError (the engine failed)."""
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
        if len(prompt) + params.max_tokens > L:
            raise SamplingError("max_tokens", f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} "
                                              f"exceeds the context of {L} tokens")
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else self._seeds.randrange(2**31 - 1)
        stream = RequestStream(rid, len(prompt), loop=loop)
        req = _Request(id=rid, prompt=prompt, params=params, seed=seed, stream=stream, arrival_time=time.perf_counter())
        with self._lock:                     # bounded: requests not yet holding a slot, inbox + routed
            if self._queued >= self.config.max_queue:
                raise QueueFullError(f"request queue is full ({self.config.max_queue} waiting for a slot)")
            self._queued += 1
            self._inbox.put_nowait(req)
        self._wake.set()
        return stream

    def stats(self) -> dict:
        return {"queue_depth": self._queued, "active_slots": len(self._running),
                "max_num_seqs": self.config.max_num_seqs, "steps": self.step_count, "healthy": self.healthy,
                "ready": self.ready}

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
        return bool(self._running or self._waiting or not self._inbox.empty())

    def _dequeue(self) -> None:
        with self._lock:
            self._queued -= 1

    def _all_requests(self) -> list[_Request]:
        reqs = list(self._running.values()) + self._waiting
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
            self._running.clear()
            self._waiting.clear()

    def _admit(self) -> None:
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            req.arrival_step = self.step_count
            req.experts = self.runner.route_prompt(req.prompt)
            req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt) if self.tokenizer is not None else None
            req.stops = StopStrings(req.params.stop)
            self._waiting.append(req)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.stream.cancelled]:
            self._finish(req, "abort")
        for req in [r for r in self._running.values() if r.stream.cancelled]:
            self._finish(req, "abort")

    def _step(self) -> None:
        t0 = time.perf_counter()
        self._admit()
        self._drop_cancelled()
        waiting = [WaitingPrefill(r.id, r.arrival_step, r.experts, r.done, r.slot) for r in self._waiting]
        running = [RunningDecode(s, r.id, r.arrival_step, r.pending_expert, r.waited)
                   for s, r in sorted(self._running.items()) if r.pending is not None]
        pick = self.scheduler.pick(waiting, running, self.config.max_num_batched_tokens, len(self._free))
        by_id = {r.id: r for r in self._waiting}
        prefill_tokens = 0
        for rid, n in pick.prefills:
            prefill_tokens += n
            self._prefill(by_id[rid], n)
        picked = [s for s in pick.decodes if s in self._running and self._running[s].pending is not None]
        distinct, reqs, experts = None, [self._running[s] for s in picked], [self._running[s].pending_expert for s in picked]
        if picked:
            if self.runner.is_moe:
                distinct = len({e for e in experts if e >= 0})
            for group in self._passes(experts, lambda: predict_future(
                    self.scheduler, {w.request_id: w for w in waiting}, {d.slot: d for d in running},
                    list(self._free), pick, self.config.max_num_batched_tokens, self.config.belady_window)):
                idx = [i for i, e in enumerate(experts) if group is None or e in group]
                toks, nxts = self.runner.decode([picked[i] for i in idx], [reqs[i].pending for i in idx],
                                                [experts[i] for i in idx], [reqs[i].seed for i in idx],
                                                [reqs[i].params.temperature for i in idx],
                                                [reqs[i].params.top_p for i in idx])
                for i, tok, nxt in zip(idx, toks.tolist(), nxts.tolist()):
                    reqs[i].waited = 0
                    self._emit(reqs[i], tok, nxt)
        for s, r in self._running.items():
            if s not in picked and r.pending is not None:
                r.waited += 1
        self.step_count += 1
        seconds = time.perf_counter() - t0
        entry = {"step": self.step_count, "seconds": seconds, "decode_tokens": len(picked),
                 "prefill_tokens": prefill_tokens, "distinct_experts": distinct,
                 "decode_experts": experts, "decode_requests": [r.id for r in reqs]}
        self.step_log.append(entry)
        if len(self.step_log) > self.STEP_LOG:
            del self.step_log[: len(self.step_log) - self.STEP_LOG]
        if self.metrics is not None:
            self.metrics.on_step(seconds, len(picked), prefill_tokens, distinct)
            self.metrics.set_gauges(self._queued, len(self._running))

    def _passes(self, experts: list[int], predict):
        """Without an expert cache: one pass (None = every token). With one: the step's expert set S in passes
        of at most k experts (resident first, then by id, as the cache processes S); before each pass the
        cache references its experts (the policy sees the rest of this step, then ``predict()``'s next steps)
        and the resident pool loads what the cache now holds. Yields each pass's expert set."""
        if self.cache is None:
            yield None
            return
        need = sorted({e for e in experts if e >= 0}, key=lambda e: (e not in self.cache.resident, e))
        k = self.cache.capacity
        groups = [set(need[i: i + k]) for i in range(0, len(need), k)]
        for g, group in enumerate(groups):
            rest = set().union(*groups[g + 1:]) if g + 1 < len(groups) else set()
            future = LazyFuture(lambda rest=rest: ([rest] if rest else []) + list(predict()))
            self.cache.reference(group, future if self.cache.policy.uses_future else WindowFuture(()))
            self.runner.pool.sync(self.cache.resident)
            yield group

    def _prefill(self, req: _Request, n: int) -> None:
        if req.slot is None:
            if not self._free:
                raise EngineError(f"scheduler {self.scheduler.name!r} admitted {req.id} with no free slot")
            req.slot = self._free.pop(0)
            self._running[req.slot] = req
            self._dequeue()
        chunk = req.prompt[req.done: req.done + n]
        is_last = req.done + n == len(req.prompt)
        tok, nxt = self.runner.prefill(req.slot, chunk, req.experts[req.done: req.done + n], is_last, req.seed,
                                       req.params.temperature, req.params.top_p)
        req.done += n
        if is_last:
            self._waiting.remove(req)
            self._emit(req, tok, nxt)

    def _emit(self, req: _Request, tok: int, nxt: int) -> None:
        """A token was sampled for ``req``: release its text, decide whether the request ends."""
        now = time.perf_counter()
        if self.metrics is not None:
            if req.last_token_time is None:
                self.metrics.on_first_token(now - req.arrival_time)
            else:
                self.metrics.on_token(now - req.last_token_time)
        req.last_token_time = now
        req.generated.append(tok)
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
        if reason is None:
            req.pending, req.pending_expert = tok, nxt
            req.stream.put(RequestOutput(req.id, [tok], text, prompt_tokens=len(req.prompt),
                                         completion_tokens=len(req.generated)))
            return
        if not hit and req.detok is not None:                # release what was held back
            held, hit = req.stops.feed(req.detok.flush())
            text += held + ("" if hit else req.stops.flush())
        self._finish(req, reason, last_tokens=[tok], text=text)

    def _finish(self, req: _Request, reason: str, *, last_tokens: list[int] | None = None, text: str = "") -> None:
        if req.closed:
            return
        if req.slot is None:
            self._dequeue()
        if req.slot is not None and self._running.get(req.slot) is req:
            del self._running[req.slot]
            self.runner.free(req.slot)
            self._free.append(req.slot)
            self._free.sort()
        if req in self._waiting:
            self._waiting.remove(req)
        req.pending = None
        req.closed = True
        req.stream.put(RequestOutput(req.id, last_tokens or [], text, finished=True, finish_reason=reason,
                                     prompt_tokens=len(req.prompt), completion_tokens=len(req.generated),
                                     error=self.error if reason == "error" else None))
        if self.metrics is not None:
            self.metrics.on_finish(len(req.generated), reason)
