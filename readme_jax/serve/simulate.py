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

Windowed Belady's future (binding definition): after the pick, the scheduler is run forward ``window`` steps
on a copy of the queue with no new arrivals. Tokens this step produces are unknown until it ends, so the
slots it advances (and prompts it completes) drop out of the prediction; everything else keeps its known
expert (decode tokens known one step ahead, prompts' tokens fully). ``instant_prefill``: arrivals go straight
into free slots as decodes, prefill uncharged — for measuring decode batching alone (running >= 4 x budget).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from readme_jax.errors import ConfigError
from readme_jax.serve.api import Pick, RunningDecode, WaitingPrefill
from readme_jax.serve.costmodel import CostModel, StepWork
from readme_jax.serve.expert_cache import POLICIES, CacheStats, ExpertCache, LazyFuture


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


class _State:
    """The queue: waiting prefills, running decodes and per-request progress."""

    def __init__(self, slots: int):
        self.waiting: dict[str, WaitingPrefill] = {}
        self.running: dict[int, RunningDecode] = {}
        self.free = list(range(slots))
        self.produced: dict[str, int] = {}
        self.ready: list[str] = []           # instant_prefill: arrived, waiting for a slot


def _apply(pick: Pick, waiting: dict, running: dict, free: list) -> list[tuple[str, int]]:
    """Advance a queue by one step: chunks progress (a new prompt takes the lowest free slot), picked
    decodes leave ``running`` (their next token is not known yet), the others wait one step more.
    Returns the completed prefills [(request_id, slot)]."""
    completed = []
    for rid, n in pick.prefills:
        w = waiting[rid]
        if w.slot is None:
            if not free:
                raise ConfigError(f"scheduler admitted {rid} with no free slot")
            w.slot = free.pop(0)
        w.done += n
        if w.remaining <= 0:
            del waiting[rid]
            completed.append((rid, w.slot))
    picked = set(pick.decodes)
    for s, r in list(running.items()):
        if s in picked:
            del running[s]
        else:
            r.waited += 1
    return completed


def _clone(st_waiting: dict, st_running: dict):
    return ({k: dataclasses.replace(v) for k, v in st_waiting.items()},
            {k: dataclasses.replace(v) for k, v in st_running.items()})


def _pick_experts(pick: Pick, waiting: dict, running: dict) -> set[int]:
    s = {int(running[slot].expert) for slot in pick.decodes}
    for rid, n in pick.prefills:
        w = waiting[rid]
        s.update(int(e) for e in np.unique(w.experts[w.done:w.done + n]))
    return s


def predict_future(scheduler, waiting: dict, running: dict, free: list, pick: Pick, budget: int,
                   window: int) -> list[set[int]]:
    """The expert sets of the next ``window`` steps as ``scheduler`` would pick them with no new arrivals,
    after ``pick`` runs (tokens it produces are unknown and drop out)."""
    w, r = _clone(waiting, running)
    fr = list(free)
    _apply(pick, w, r, fr)
    out = []
    for _ in range(window):
        if not w and not r:
            break
        p = scheduler.pick(list(w.values()), list(r.values()), budget, len(fr))
        if p.num_tokens == 0:
            break
        out.append(_pick_experts(p, w, r))
        _apply(p, w, r, fr)
    return out


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
    st = _State(cfg.slots)
    rec = {k: [] for k in ("start", "time", "dexp", "running", "dtok")}
    sets, futures, prefill_exp, works = [], [], [], []
    now, nxt, step, done = 0.0, 0, 0, 0

    def start_decode(rid: str, slot: int, t: float) -> None:
        nonlocal done
        q = reqs[rid]
        st.produced[rid] = 1
        if np.isnan(ttft[idx[rid]]):
            ttft[idx[rid]] = t
        if q.output == 1:
            finish[idx[rid]] = t
            st.free.append(slot)
            st.free.sort()
            done += 1
        else:
            st.running[slot] = RunningDecode(slot, rid, int(q.arrival * 1e6), int(q.experts[q.prompt]))

    while done < n:
        if step >= cfg.max_steps:
            raise ConfigError(f"simulate: {cfg.max_steps} steps without finishing {n} requests (scheduler "
                              f"{scheduler.name}); raise SimConfig.max_steps")
        while nxt < n and order[nxt].arrival <= now:
            q = order[nxt]
            nxt += 1
            if cfg.instant_prefill:
                st.ready.append(q.request_id)
            else:
                st.waiting[q.request_id] = WaitingPrefill(q.request_id, int(q.arrival * 1e6),
                                                          q.experts[:q.prompt])
        while st.ready and st.free:
            start_decode(st.ready.pop(0), st.free.pop(0), now)
        if not st.running and not st.waiting:
            if nxt >= n and done < n:
                raise ConfigError(f"simulate: {n - done} requests neither running nor waiting")
            if nxt < n:
                now = max(now, order[nxt].arrival)
            continue
        waiting = st.waiting
        pick = scheduler.pick(list(waiting.values()), list(st.running.values()), cfg.budget, len(st.free))
        if pick.num_tokens == 0 or pick.num_tokens > cfg.budget:
            raise ConfigError(f"scheduler {scheduler.name} picked {pick.num_tokens} tokens (budget {cfg.budget}) "
                              f"with {len(waiting)} waiting and {len(st.running)} running")
        S = _pick_experts(pick, waiting, st.running)
        fut = LazyFuture(lambda: predict_future(scheduler, waiting, st.running, st.free, pick, cfg.budget,
                                                cfg.window))
        refs = cache.reference(S, fut) if cache is not None else None
        work = StepWork(decode_tokens=len(pick.decodes),
                        decode_context=sum(reqs[st.running[s].request_id].prompt
                                           + st.produced[st.running[s].request_id] - 1 for s in pick.decodes),
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
        decoded = [(s, st.running[s].request_id) for s in pick.decodes]
        completed = _apply(pick, st.waiting, st.running, st.free)
        now += dt
        step += 1
        for rid, slot in completed:
            start_decode(rid, slot, now)
        for slot, rid in decoded:
            q = reqs[rid]
            st.produced[rid] += 1
            k = st.produced[rid]
            if k >= q.output:
                finish[idx[rid]] = now
                st.free.append(slot)
                st.free.sort()
                done += 1
            else:
                st.running[slot] = RunningDecode(slot, rid, int(q.arrival * 1e6), int(q.experts[q.prompt + k - 1]))
    arr = {k: np.asarray(v) for k, v in rec.items()}
    return SimResult(np.array([q.arrival for q in requests]), ttft - np.array([q.arrival for q in requests]),
                     finish, np.array([q.output for q in requests], np.float64), arr["start"], arr["time"],
                     arr["dexp"], arr["running"], arr["dtok"], sets, futures,
                     np.asarray(prefill_exp), cache.stats if cache is not None else CacheStats(), works)
