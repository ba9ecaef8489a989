"""Expert cache at simulation level: k resident expert slots per layer, the rest in slow memory.

Routing is shared by every layer (one router, run before the backbone), so every layer references the same
expert set S at a step and, with deterministic policies, every layer's cache holds the same experts. One
:class:`ExpertCache` therefore stands for all ``num_layers`` caches; its counters count every layer.

A **reference** (binding definition, issue 9) is a (step, layer) needing the set S. With contents C of at
most k experts: hits = |S ∩ C|, misses = |S \\ C|. S is processed in one order for every policy: residents
first, then the missing experts by id; a missing expert is loaded into a free slot, else over a victim the
policy picks among C \\ S (experts this step does not need). When |S| > k the layer runs in ceil(|S| / k)
passes and C \\ S can be empty: the victim is then an expert of S already computed this step. Either way the
rest of this step never needs a candidate, so a policy's ``future`` is the sets of the following steps.

Policies share one interface, ``victim(candidates, future) -> expert``, plus bookkeeping hooks; each registers
in :data:`POLICIES` with one decorator (``@POLICIES.register(name, OptionsDataclass)``) and declares
``uses_future`` (True: callers build the predicted future for it; False: they pass an empty one):
- ``belady``: farthest next use in ``future`` (a :class:`WindowFuture` of the next W steps as the scheduler
  would pick them with no new arrivals, or the whole trace for the offline optimum, :class:`TraceFuture`);
  ties (e.g. several experts never used within the window): least recently used, then lower id.
  Farthest-next-use is optimal when every |S| <= k (the paging exchange argument; the tests check it against
  an exhaustive search). With multi-pass steps (|S| > k) it is not (e.g. k=2, {0,1,2},{0,1,2},{1,2},{1,2}:
  Belady 5 misses, best 4), so the offline optimum is :func:`offline_optimum`, an exact search over cache
  states under the same processing rules.
- ``lru`` (least recently used), ``lfu`` (fewest uses since it was loaded; ties LRU), ``fifo`` (loaded
  earliest), ``random`` (uniform over candidates, seeded). Every rule's last tie-break is the lower id.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from readme_jax.errors import ConfigError
from readme_jax.registry import Registry

NEVER = math.inf

#: Every cache policy by name; the serve CLI, benchmarks and tests read it.
POLICIES = Registry("cache policy")


class WindowFuture:
    """The next steps' expert sets (a window): ``next_use(e)`` = 1-based step offset of e's next use, or inf."""

    def __init__(self, sets: Sequence[Iterable[int]]):
        self.sets = [frozenset(int(x) for x in s) for s in sets]

    def next_use(self, expert: int) -> float:
        for i, s in enumerate(self.sets, 1):
            if expert in s:
                return i
        return NEVER


class LazyFuture(WindowFuture):
    """A :class:`WindowFuture` computed on first use by ``predict() -> sets`` (only when a victim is needed)."""

    def __init__(self, predict):
        self.predict, self._sets = predict, None

    @property
    def sets(self):
        if self._sets is None:
            self._sets = [frozenset(int(x) for x in s) for s in self.predict()]
        return self._sets


class TraceFuture:
    """The whole rest of a recorded trace (offline optimum), O(1) per query from a next-use table.

    table: <int64>[T + 1, E'] index of the first step >= t using expert column j (T if none); cols maps an
    expert id to its column."""

    def __init__(self, table: np.ndarray, cols: dict[int, int], step: int):
        self.table, self.cols, self.step = table, cols, step

    @classmethod
    def tables(cls, trace: Sequence[Iterable[int]]) -> tuple[np.ndarray, dict[int, int]]:
        """The next-use table of a trace of expert sets (see the class doc)."""
        experts = sorted({int(e) for s in trace for e in s})
        cols = {e: j for j, e in enumerate(experts)}
        T = len(trace)
        table = np.full((T + 1, max(len(experts), 1)), T, np.int64)
        for t in range(T - 1, -1, -1):
            table[t] = table[t + 1]
            for e in trace[t]:
                table[t, cols[int(e)]] = t
        return table, cols

    def next_use(self, expert: int) -> float:
        j = self.cols.get(int(expert))
        if j is None:
            return NEVER
        t = int(self.table[self.step + 1, j])
        return NEVER if t >= self.table.shape[0] - 1 else t - self.step


class Policy:
    """Bookkeeping shared by every policy: access clock, last use, load time and uses since load.
    ``uses_future``: whether ``victim`` reads ``future`` (only then do callers predict one)."""

    name = "policy"
    uses_future = False

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.clock = 0
        self.last_use: dict[int, int] = {}
        self.loaded_at: dict[int, int] = {}
        self.uses: dict[int, int] = {}

    def on_use(self, expert: int) -> None:
        self.clock += 1
        self.last_use[expert] = self.clock
        self.uses[expert] = self.uses.get(expert, 0) + 1

    def on_insert(self, expert: int) -> None:
        self.loaded_at[expert] = self.clock
        self.uses[expert] = 0

    def on_evict(self, expert: int) -> None:
        self.loaded_at.pop(expert, None)
        self.uses.pop(expert, None)

    def victim(self, candidates: Sequence[int], future) -> int:
        raise NotImplementedError


@POLICIES.register("lru")
class LRU(Policy):
    """Least recently used."""

    def victim(self, candidates, future):
        return min(candidates, key=lambda e: (self.last_use.get(e, 0), e))


@POLICIES.register("lfu")
class LFU(Policy):
    """Fewest uses since it was loaded; ties least recently used."""

    def victim(self, candidates, future):
        return min(candidates, key=lambda e: (self.uses.get(e, 0), self.last_use.get(e, 0), e))


@POLICIES.register("fifo")
class FIFO(Policy):
    """Loaded earliest."""

    def victim(self, candidates, future):
        return min(candidates, key=lambda e: (self.loaded_at.get(e, 0), e))


@dataclasses.dataclass(frozen=True)
class RandomOptions:
    seed: int = 0                # the victim stream's seed

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"random cache policy: seed must be an integer, got {self.seed!r}")


@POLICIES.register("random", RandomOptions)
class Random(Policy):
    """Uniform over the candidates (seeded)."""

    def __init__(self, options: RandomOptions = RandomOptions()):
        self.seed = options.seed
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.rng = np.random.default_rng(self.seed)

    def victim(self, candidates, future):
        return sorted(candidates)[int(self.rng.integers(len(candidates)))]


@POLICIES.register("belady")
class Belady(Policy):
    """Farthest next use in ``future`` (windowed or whole-trace); ties: least recently used, then lower id."""

    uses_future = True

    def victim(self, candidates, future):
        return max(candidates, key=lambda e: (future.next_use(e), -self.last_use.get(e, 0), -e))


def make_policy(name: str, **opts) -> Policy:
    """``POLICIES.make(name, **opts)``: a cache policy by registered name with its options (ConfigError for an
    unknown name or option)."""
    return POLICIES.make(name, **opts)


@dataclasses.dataclass
class CacheStats:
    """Counters over every layer: references (step x layer), hits, misses (= loads), passes, bytes moved
    over the link, stall seconds (added by the cost model: load time not hidden by prefetch)."""

    references: int = 0
    hits: int = 0
    misses: int = 0
    passes: int = 0
    bytes_moved: float = 0.0
    stall_s: float = 0.0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


@dataclasses.dataclass(frozen=True)
class StepRefs:
    """One step's reference at one layer (identical at every layer): hits, misses, passes, loaded experts."""

    hits: int
    misses: int
    passes: int
    loaded: tuple[int, ...]


class ExpertCache:
    """k resident slots per layer under ``policy``; ``reference(S, future)`` processes one step (all layers)."""

    def __init__(self, capacity: int, policy: Policy, *, num_layers: int = 1, expert_bytes: float = 0.0):
        if int(capacity) < 1:
            raise ConfigError(f"ExpertCache: capacity must be >= 1 expert per layer, got {capacity}")
        if int(num_layers) < 1:
            raise ConfigError(f"ExpertCache: num_layers must be >= 1, got {num_layers}")
        self.capacity, self.policy = int(capacity), policy
        self.num_layers, self.expert_bytes = int(num_layers), float(expert_bytes)
        self.resident: set[int] = set()
        self.stats = CacheStats()
        policy.reset()

    def reference(self, experts: Iterable[int], future=None) -> StepRefs:
        """Process the step's expert set S at every layer; ``future`` is what the policy may look at."""
        need = {int(e) for e in experts}
        hits = sorted(need & self.resident)
        missing = sorted(need - self.resident)
        for e in hits:
            self.policy.on_use(e)
        done = set(hits)
        future = WindowFuture(()) if future is None else future
        for e in missing:
            if len(self.resident) >= self.capacity:
                candidates = sorted(self.resident - need) or sorted(self.resident & done)
                v = self.policy.victim(candidates, future)
                self.resident.remove(v)
                self.policy.on_evict(v)
            self.resident.add(e)
            self.policy.on_insert(e)
            self.policy.on_use(e)
            done.add(e)
        passes = max(1, math.ceil(len(need) / self.capacity)) if need else 0
        L = self.num_layers
        self.stats.references += L
        self.stats.hits += L * len(hits)
        self.stats.misses += L * len(missing)
        self.stats.passes += L * passes
        self.stats.bytes_moved += L * len(missing) * self.expert_bytes
        return StepRefs(len(hits), len(missing), passes, tuple(missing))


def replay(trace: Sequence[Iterable[int]], policy: Policy, capacity: int, *, window: int | None = None,
           futures: Sequence[Sequence[Iterable[int]]] | None = None, num_layers: int = 1,
           expert_bytes: float = 0.0) -> CacheStats:
    """Run a recorded trace of per-step expert sets through a fresh cache.

    Belady's future: ``futures[t]`` (the sets the scheduler predicted after step t) when given; else the
    next ``window`` steps of the trace itself; else (window None) the whole rest of the trace (offline
    optimum). A policy that does not use the future (``uses_future`` False) gets none."""
    trace = [frozenset(int(e) for e in s) for s in trace]
    if futures is not None and len(futures) != len(trace):
        raise ValueError(f"replay: futures has {len(futures)} entries, the trace {len(trace)} steps")
    cache = ExpertCache(capacity, policy, num_layers=num_layers, expert_bytes=expert_bytes)
    uses_future = policy.uses_future
    table = cols = None
    if uses_future and futures is None and window is None:
        table, cols = TraceFuture.tables(trace)
    for t, s in enumerate(trace):
        fut = None
        if uses_future:
            if futures is not None:
                fut = WindowFuture(futures[t])
            elif window is None:
                fut = TraceFuture(table, cols, t)
            else:
                fut = WindowFuture(trace[t + 1:t + 1 + window])
        cache.reference(s, fut)
    return cache.stats


def _end_states(cache: frozenset, need: frozenset, capacity: int) -> set[frozenset]:
    """Every cache content a step can end in under the processing rules, over all victim choices."""
    states = {(cache, need & cache)}
    for e in sorted(need - cache):
        nxt = set()
        for c, done in states:
            if len(c) < capacity:
                nxt.add((c | {e}, done | {e}))
                continue
            for v in sorted(c - need) or sorted(c & done):
                nxt.add(((c - {v}) | {e}, done | {e}))
        states = nxt
    return {c for c, _ in states}


def offline_optimum(trace: Sequence[Iterable[int]], capacity: int) -> int:
    """Fewest misses per layer any victim choice achieves on ``trace`` (exact, dynamic programming over cache
    contents; states <= C(E, k), so meant for E <= ~10)."""
    if int(capacity) < 1:
        raise ConfigError(f"offline_optimum: capacity must be >= 1, got {capacity}")
    best = {frozenset(): 0}
    for s in trace:
        need = frozenset(int(e) for e in s)
        nxt: dict[frozenset, int] = {}
        for c, m in best.items():
            cost = m + len(need - c)
            for end in _end_states(c, need, int(capacity)):
                if cost < nxt.get(end, math.inf):
                    nxt[end] = cost
        best = nxt
    return min(best.values())
