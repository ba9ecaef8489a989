"""Trace-driven step simulator: requests with known expert streams run through a scheduler (the engine's
``Scheduler`` interface, unchanged), an :class:`~readme_jax.serve.expert_cache.ExpertCache` and a
:class:`~readme_jax.serve.costmodel.CostModel` that gives each step its time.

    result = simulate(requests, make_scheduler("expert-aware", max_wait=8), SimConfig(slots=128, budget=32,
                      capacity=4, policy="belady"), cost=CostModel(model, hw, "layer-ahead"))

Per step: arrivals up to ``now`` join the waiting queue; the scheduler picks; the step's expert set S (its
decode tokens' experts and its prefill chunks' experts) is one cache reference at every layer; the cost model
turns the work and the misses into seconds (without a cost model every step lasts 1 s, for step-count
studies). A prefill that completes yields the request's first token (TTFT) at the step's end; each decode
yields one token; a request ends after its G-th token and frees its slot.

The queue's transitions and windowed Belady's future are the engine's own (``serve/queue_state.py``:
``QueueState.apply`` / ``future``), so an engine step log replayed here reproduces every pick. ``instant_prefill``: arrivals go straight
into free slots as decodes, prefill uncharged — for measuring decode batching alone (running >= 4 x budget).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from readme_jax.errors import ConfigError
from readme_jax.serve.api import WaitingPrefill
from readme_jax.serve.costmodel import CostModel, StepWork
from readme_jax.serve.expert_cache import POLICIES, CacheStats, ExpertCache, LazyFuture
from readme_jax.serve.queue_state import QueueState


@dataclasses.dataclass(frozen=True)
class SimRequest:
    """One request: arrival seconds, prompt length P, output length G, experts <int32>[P + G - 1] (prompt
    tokens, then decode step j's token at P + j)."""

    request_id: str
    arrival: float
    prompt: int
    output: int
    experts: np.ndarray

    def __post_init__(self):
        if self.prompt < 1 or self.output < 1 or self.experts.shape != (self.prompt + self.output - 1,):
            raise ConfigError(f"SimRequest {self.request_id}: need prompt, output >= 1 and experts of shape "
                              f"[{self.prompt + self.output - 1}], got {self.prompt}, {self.output}, "
                              f"{self.experts.shape}")


def make_requests(arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray,
                  experts: Sequence[np.ndarray]) -> list[SimRequest]:
    """SimRequests from arrays <[N]> (arrival seconds, prompt and output lengths) and per-request experts."""
    width = len(str(max(len(arrival) - 1, 0)))
    return [SimRequest(f"r{i:0{width}d}", float(a), int(p), int(g), np.asarray(e, np.int32))
            for i, (a, p, g, e) in enumerate(zip(arrival, prompt, output, experts))]


@dataclasses.dataclass(frozen=True)
class SimConfig:
    slots: int
    budget: int
    capacity: int | None = None      # resident experts per layer; None: no cache (all resident)
    policy: str = "lru"
    window: int = 8                  # windowed Belady's lookahead in steps
    seed: int = 0                    # the random policy's seed
    instant_prefill: bool = False
    max_steps: int = 2_000_000
    record_futures: bool = False     # keep every step's predicted future (for replaying other policies)
    record_picks: bool = False       # keep every step's Pick (an engine step log replayed must match them)
    token_buckets: tuple[int, ...] | None = None   # the engine's compiled token counts (picks fit to them)


@dataclasses.dataclass
class SimResult:
    """Per request (arrival order): arrival, ttft, finish seconds, output tokens. Per step: start seconds,
    duration, distinct decode experts, running decodes, decode tokens, the step's expert set, the predicted
    future sets (with ``record_futures``, for replays) and its StepWork. Prefill chunks: distinct experts."""

    arrival: np.ndarray
    ttft: np.ndarray
    finish: np.ndarray
    output: np.ndarray
    step_start: np.ndarray
    step_time: np.ndarray
    decode_experts: np.ndarray
    running: np.ndarray
    decode_tokens: np.ndarray
    sets: list
    futures: list
    prefill_experts: np.ndarray
    cache: CacheStats
    works: list                      # each step's StepWork (misses from the policy in the loop)
    picks: list                      # each step's Pick (with ``record_picks``)

    @property
    def normalised_latency(self) -> np.ndarray:
        """End-to-end seconds / generated tokens, per request."""
        return (self.finish - self.arrival) / self.output

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole run."""
        return float(self.output.sum() / (self.finish.max() - self.arrival.min()))

    @property
    def request_rate(self) -> float:
        """Completed requests per second over the whole run."""
        return float(len(self.output) / (self.finish.max() - self.arrival.min()))


def requests_from_log(step_log: Sequence[dict]) -> list[SimRequest]:
    """The requests of an engine step log (``Engine.step_log`` from the engine's first step; every request
    ran to stop or length) as a trace for ``simulate`` with ``cost=None`` (one step = 1 s): arrival = the step
    before which it arrived, its prompt length, its generated tokens (1 + its decodes) and the experts its
    decode tokens ran with. Prompt tokens' experts are -1 (the log does not keep them; picks never read them).
    Replayed with the engine's scheduler, slots and budget, ``simulate`` reproduces every pick."""
    arrival, prompt, decoded = {}, {}, {}
    for entry in step_log:
        for rid, n in entry["arrivals"]:
            arrival[rid], prompt[rid], decoded[rid] = entry["step"] - 1, n, []
        for rid, e in zip(entry["decode_requests"], entry["decode_experts"]):
            decoded[rid].append(e)
    return [SimRequest(rid, float(arrival[rid]), prompt[rid], 1 + len(decoded[rid]),
                       np.asarray([-1] * prompt[rid] + decoded[rid], np.int32)) for rid in arrival]


def simulate(requests: Sequence[SimRequest], scheduler, cfg: SimConfig, cost: CostModel | None = None
             ) -> SimResult:
    """Run every request to completion (see the module doc)."""
    if cfg.slots < 1 or cfg.budget < 1:
        raise ConfigError(f"SimConfig: slots and budget must be >= 1, got {cfg.slots}, {cfg.budget}")
    reqs = {q.request_id: q for q in requests}
    order = sorted(requests, key=lambda q: (q.arrival, q.request_id))
    idx = {q.request_id: i for i, q in enumerate(requests)}
    n = len(requests)
    ttft, finish = np.full(n, np.nan), np.full(n, np.nan)
    cache = None
    if cfg.capacity is not None:
        policy = POLICIES.make_from(cfg.policy, {"seed": cfg.seed})
        cache = ExpertCache(cfg.capacity, policy, num_layers=cost.model.num_layers if cost else 1,
                            expert_bytes=cost.model.expert_bytes if cost else 0.0)
    if cost is not None:
        cost.reset()
    st = QueueState(cfg.slots, cfg.token_buckets)
    produced: dict[str, int] = {}
    ready: list[str] = []                                     # instant_prefill: arrived, waiting for a slot
    rec = {k: [] for k in ("start", "time", "dexp", "running", "dtok")}
    sets, futures, prefill_exp, works, picks = [], [], [], [], []
    now, nxt, step, done = 0.0, 0, 0, 0

    def start_decode(rid: str, slot: int, t: float) -> None:
        nonlocal done
        q = reqs[rid]
        produced[rid] = 1
        if np.isnan(ttft[idx[rid]]):
            ttft[idx[rid]] = t
        if q.output == 1:
            finish[idx[rid]] = t
            st.release(slot)
            done += 1
        else:
            st.ready(slot, rid, int(q.arrival * 1e6), int(q.experts[q.prompt]))

    while done < n:
        if step >= cfg.max_steps:
            raise ConfigError(f"simulate: {cfg.max_steps} steps without finishing {n} requests (scheduler "
                              f"{scheduler.name}); raise SimConfig.max_steps")
        while nxt < n and order[nxt].arrival <= now:
            q = order[nxt]
            nxt += 1
            if cfg.instant_prefill:
                ready.append(q.request_id)
            else:
                st.arrive(WaitingPrefill(q.request_id, int(q.arrival * 1e6), q.experts[:q.prompt]))
        while ready and st.free:
            start_decode(ready.pop(0), st.free.pop(0), now)
        if not st.running and not st.waiting:
            if nxt >= n and done < n:
                raise ConfigError(f"simulate: {n - done} requests neither running nor waiting")
            if nxt < n:
                now = max(now, order[nxt].arrival)
            continue
        waiting = st.waiting
        pick = st.pick(scheduler, cfg.budget)
        if pick.num_tokens == 0:
            raise ConfigError(f"scheduler {scheduler.name} picked no tokens with {len(waiting)} waiting and "
                              f"{len(st.running)} running")
        S = st.experts(pick)
        fut = LazyFuture(lambda: st.future(scheduler, pick, cfg.budget, cfg.window))
        refs = cache.reference(S, fut) if cache is not None else None
        work = StepWork(decode_tokens=len(pick.decodes),
                        decode_context=sum(reqs[st.running[s].request_id].prompt
                                           + produced[st.running[s].request_id] - 1 for s in pick.decodes),
                        prefill_tokens=sum(m for _, m in pick.prefills),
                        prefill_context=sum(waiting[rid].done for rid, _ in pick.prefills),
                        prefill_attended=sum(m * waiting[rid].done + m * (m + 1) // 2 for rid, m in pick.prefills),
                        experts=len(S), misses=refs.misses if refs else 0)
        works.append(work)
        for rid, m in pick.prefills:
            w = waiting[rid]
            prefill_exp.append(len(np.unique(w.experts[w.done:w.done + m])))
        dexp = len({st.running[s].expert for s in pick.decodes})
        n_running = len(st.running)
        if cost is not None:
            dt, stall = cost.step(work, now)
            if cache is not None:
                cache.stats.stall_s += stall
        else:
            dt = 1.0
        rec["start"].append(now), rec["time"].append(dt), rec["dexp"].append(dexp)
        rec["running"].append(n_running), rec["dtok"].append(len(pick.decodes))
        sets.append(frozenset(S))
        if cfg.record_futures:
            futures.append(fut.sets)
        if cfg.record_picks:
            picks.append(pick)
        adv = st.apply(pick)
        now += dt
        step += 1
        for c in adv.chunks:
            if c.last:
                start_decode(c.request_id, c.slot, now)
        for slot, rid in adv.decoded:
            q = reqs[rid]
            produced[rid] += 1
            k = produced[rid]
            if k >= q.output:
                finish[idx[rid]] = now
                st.release(slot)
                done += 1
            else:
                st.ready(slot, rid, int(q.arrival * 1e6), int(q.experts[q.prompt + k - 1]))
    arr = {k: np.asarray(v) for k, v in rec.items()}
    return SimResult(np.array([q.arrival for q in requests]), ttft - np.array([q.arrival for q in requests]),
                     finish, np.array([q.output for q in requests], np.float64), arr["start"], arr["time"],
                     arr["dexp"], arr["running"], arr["dtok"], sets, futures,
                     np.asarray(prefill_exp), cache.stats if cache is not None else CacheStats(), works, picks)
