"""Batching policies behind :class:`readme_jax.serve.api.Scheduler`: decode-first FCFS, prefill-first FCFS
and expert-aware batching (Read-ME Algorithm 1 with a wait bound). All share one token budget per step.

    sched = SCHEDULERS.make("expert-aware", max_wait=8)      # or make_scheduler(...), the same
    pick = sched.pick(waiting, running, budget=32, free_slots=4)

Orders used by every policy (``priority``: vLLM's, lower is served first, 0 unless a request sets it):
- decode FCFS: lower ``priority``, then longest wait (``waited`` descending), then earlier ``arrival``, then
  lower slot;
- prefill FCFS: requests already admitted (a chunk in progress) before new ones, then lower ``priority``, then
  earlier ``arrival``, then ``request_id``; a prompt is cut into a chunk when the budget left is smaller than
  what remains; a new prompt needs a free slot (``free_slots`` bounds admissions per step).

Expert-aware batching, over the running decode tokens:
1. **Wait bound** (earliest deadline first; ties: lower priority, earlier arrival): a token's slack is
   ``max_wait - waited``. With c_j the number of tokens of slack <= j, the step must take at least
   ``m = max_j (c_j - budget * j)`` of the most urgent tokens (those with slack <= j cannot all wait past the
   next j steps otherwise). Taking them first keeps
   every token's wait <= ``max_wait`` steps whenever the running decodes number at most
   ``budget * (max_wait + 1)`` (no scheduler can do better: each slot needs a turn every max_wait+1 steps).
   Above that it still serves the most urgent first. A token of wait >= max_wait always has m >= 1.
2. **Prefill units** (a prompt, or a chunk of it) come next, in prefill FCFS order, as in prefill-first:
   with one token budget, a policy that serves prompts only from the budget left after all decodes cannot
   hold more running decodes than the budget (every admission waits for the running set to drain below it),
   so it would never have a choice to make. The wait bound still holds: the urgent decodes go before them.
3. **Algorithm 1** on the budget left: repeatedly take the expert with the most waiting decode tokens (ties:
   the lower expert id; a dense model's -1 is one group) and add its tokens (decode FCFS order within the
   expert) until the budget is full; the last expert may be cut.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from readme_jax.errors import ConfigError
from readme_jax.registry import Registry
from readme_jax.serve.api import Pick, RunningDecode, WaitingPrefill

#: Every batching policy: ``@SCHEDULERS.register(name, OptionsDataclass)`` on a class with
#: ``pick(waiting, running, budget, free_slots) -> Pick``; the serve CLI, benchmarks and tests read it.
SCHEDULERS = Registry("scheduler")


def _check_budget(budget: int, free_slots: int) -> None:
    if int(budget) < 1:
        raise ValueError(f"Scheduler.pick: budget must be >= 1 token, got {budget}")
    if int(free_slots) < 0:
        raise ValueError(f"Scheduler.pick: free_slots must be >= 0, got {free_slots}")


def decode_order(running: Sequence[RunningDecode]) -> list[RunningDecode]:
    """Decode FCFS: lower priority, then longest wait, then earlier arrival, then lower slot."""
    return sorted(running, key=lambda r: (r.priority, -r.waited, r.arrival, r.slot))


def prefill_order(waiting: Sequence[WaitingPrefill]) -> list[WaitingPrefill]:
    """Prefill FCFS: admitted (chunk in progress) first, then lower priority, then earlier arrival, then id."""
    return sorted(waiting, key=lambda w: (w.slot is None, w.priority, w.arrival, w.request_id))


def fill_prefills(waiting: Sequence[WaitingPrefill], budget: int, free_slots: int) -> list[tuple[str, int]]:
    """Prefill chunks in FCFS order within ``budget`` tokens, admitting at most ``free_slots`` new prompts."""
    out, left, admit = [], int(budget), int(free_slots)
    for w in prefill_order(waiting):
        if left <= 0:
            break
        if w.remaining <= 0:
            continue
        if w.slot is None:
            if admit <= 0:
                continue
            admit -= 1
        n = min(w.remaining, left)
        out.append((w.request_id, n))
        left -= n
    return out


@SCHEDULERS.register("decode-first")
class DecodeFirst:
    """Every running decode token first (FCFS), then prefill chunks with the budget left."""

    def pick(self, waiting: Sequence[WaitingPrefill], running: Sequence[RunningDecode], budget: int,
             free_slots: int) -> Pick:
        _check_budget(budget, free_slots)
        decodes = [r.slot for r in decode_order(running)[:budget]]
        return Pick(prefills=tuple(fill_prefills(waiting, budget - len(decodes), free_slots)),
                    decodes=tuple(decodes))


@SCHEDULERS.register("prefill-first")
class PrefillFirst:
    """Waiting prompts first (FCFS, chunked), then running decode tokens (FCFS) with the budget left."""

    def pick(self, waiting: Sequence[WaitingPrefill], running: Sequence[RunningDecode], budget: int,
             free_slots: int) -> Pick:
        _check_budget(budget, free_slots)
        prefills = fill_prefills(waiting, budget, free_slots)
        left = budget - sum(n for _, n in prefills)
        decodes = [r.slot for r in decode_order(running)[:left]]
        return Pick(prefills=tuple(prefills), decodes=tuple(decodes))


def must_take(slack: np.ndarray, budget: int) -> int:
    """How many of the most urgent tokens this step must take: max(0, max_j (#(slack <= j) - budget * j)).

    slack: <int>[N] max_wait - waited per running decode token (negative: already over the bound)."""
    if slack.size == 0:
        return 0
    s = np.maximum(slack, 0)
    counts = np.cumsum(np.bincount(s))                      # counts[j] = #tokens with slack <= j
    need = counts - budget * np.arange(counts.size)
    return int(min(max(need.max(), 0), slack.size))


def algorithm1(tokens: Sequence[RunningDecode], budget: int) -> list[RunningDecode]:
    """Read-ME Algorithm 1: take the expert with the most waiting tokens (ties: lower id) until the budget
    is full; within an expert, decode FCFS order. Returns the tokens taken, in taking order."""
    groups: dict[int, list[RunningDecode]] = {}
    for r in decode_order(tokens):
        groups.setdefault(int(r.expert), []).append(r)
    taken: list[RunningDecode] = []
    for expert in sorted(groups, key=lambda e: (-len(groups[e]), e)):
        if len(taken) >= budget:
            break
        taken += groups[expert][:budget - len(taken)]
    return taken


@dataclasses.dataclass(frozen=True)
class ExpertAwareOptions:
    max_wait: int = 8            # steps a decode token may wait at most (the wait bound)

    def __post_init__(self):
        if isinstance(self.max_wait, bool) or not isinstance(self.max_wait, int) or self.max_wait < 0:
            raise ConfigError(f"expert-aware scheduler: max_wait must be an integer >= 0 steps, got {self.max_wait!r}")


@SCHEDULERS.register("expert-aware", ExpertAwareOptions)
class ExpertAware:
    """Urgent decodes (wait bound), then prefill chunks, then Algorithm 1 over the other decodes."""

    def __init__(self, options: ExpertAwareOptions = ExpertAwareOptions()):
        self.max_wait = options.max_wait

    def urgent(self, running: Sequence[RunningDecode], budget: int) -> tuple[list, list]:
        """(the decode tokens the wait bound forces this step, the others), most urgent first; at most
        ``budget`` forced (past the bound more can be due than a step holds: the most urgent go first)."""
        urgent_first = sorted(running, key=lambda r: (self.max_wait - r.waited, r.priority, r.arrival, r.slot))
        m = min(must_take(np.array([self.max_wait - r.waited for r in urgent_first], np.int64), budget), budget)
        return urgent_first[:m], urgent_first[m:]

    def pick(self, waiting: Sequence[WaitingPrefill], running: Sequence[RunningDecode], budget: int,
             free_slots: int) -> Pick:
        _check_budget(budget, free_slots)
        forced, rest = self.urgent(running, budget)
        prefills = fill_prefills(waiting, budget - len(forced), free_slots)
        left = budget - len(forced) - sum(n for _, n in prefills)
        decodes = [r.slot for r in forced + algorithm1(rest, left)]
        return Pick(prefills=tuple(prefills), decodes=tuple(decodes))


def make_scheduler(name: str, **opts):
    """``SCHEDULERS.make(name, **opts)``: a scheduler by registered name with its options (ConfigError for an
    unknown name or option)."""
    return SCHEDULERS.make(name, **opts)
