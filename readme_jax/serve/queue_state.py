"""The request queue's state machine, one for the engine and the simulator: waiting prefills, running decodes,
free sequence slots, and the transitions of one step.

    q = QueueState(slots=8, buckets=(16, 32, 64, 128, 256))
    q.arrive(WaitingPrefill("r0", arrival, experts))          # a prompt (experts: its tokens' expert ids)
    pick = q.pick(scheduler, budget, admissible=n)            # the scheduler's Pick, checked, fit to buckets
    adv = q.apply(pick)                                       # chunks advance, picked decodes leave `running`
    q.ready(slot, "r0", arrival, expert)                      # a sampled token now waits to run
    q.release(slot)                                           # the request ended: its slot is free

Transitions (binding for the engine and ``simulate``): a picked prompt chunk continues where its prefill
stopped; a new prompt (``slot is None``) takes the lowest free slot; a prompt whose last chunk ran leaves
``waiting`` (its first token is sampled at the step's end); a picked decode leaves ``running`` until its next
token is known (``ready``); a running decode not picked waits one step more (``waited`` + 1). ``admissible``
bounds the new prompts a step may admit below the free slots (the engine: those whose pages fit).
``buckets`` (the runner's compiled token counts; a step is padded up to the next one): a pick just over a
bucket gives back its excess prompt tokens from the last chunks (``fit_to_buckets``), so 7 decodes and one
128-token prompt run as 128 tokens then 16, not as one step padded to 256.
``future`` runs the scheduler forward on a copy with no arrivals (windowed Belady's prediction): tokens the
current step produces are unknown, so the decodes it advances and the prompts it completes drop out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from readme_jax.errors import EngineError
from readme_jax.serve.api import Pick, RunningDecode, WaitingPrefill


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A prefill chunk a step runs: tokens [start, start + n) of the request's prompt into ``slot``; ``last``:
    the prompt is complete after it."""

    request_id: str
    slot: int
    start: int
    n: int
    last: bool


@dataclasses.dataclass(frozen=True)
class Advance:
    """What ``apply`` did: the chunks run (in pick order) and the decodes advanced [(slot, request_id)]."""

    chunks: tuple[Chunk, ...]
    decoded: tuple[tuple[int, str], ...]


class QueueState:
    """See the module docstring."""

    def __init__(self, slots: int, buckets: tuple[int, ...] | None = None):
        self.slots = int(slots)
        self.buckets = tuple(sorted(buckets)) if buckets else None
        self.waiting: dict[str, WaitingPrefill] = {}
        self.running: dict[int, RunningDecode] = {}
        self.free: list[int] = list(range(self.slots))

    @property
    def busy_slots(self) -> int:
        return self.slots - len(self.free)

    def clone(self) -> QueueState:
        q = QueueState.__new__(QueueState)
        q.slots, q.buckets, q.free = self.slots, self.buckets, list(self.free)
        q.waiting = {k: dataclasses.replace(v) for k, v in self.waiting.items()}
        q.running = {k: dataclasses.replace(v) for k, v in self.running.items()}
        return q

    # --- transitions --------------------------------------------------------------------------------------
    def arrive(self, w: WaitingPrefill) -> None:
        if w.request_id in self.waiting:
            raise EngineError(f"QueueState: request {w.request_id!r} is already waiting")
        self.waiting[w.request_id] = w

    def pick(self, scheduler, budget: int, admissible: int | None = None) -> Pick:
        """The scheduler's pick for this state, checked against the state (an inconsistent pick raises
        EngineError naming the scheduler), then fit to the buckets (see the module docstring)."""
        free = len(self.free) if admissible is None else max(0, min(int(admissible), len(self.free)))
        pick = scheduler.pick(list(self.waiting.values()), list(self.running.values()), budget, free)
        name = getattr(scheduler, "name", type(scheduler).__name__)
        new = 0
        for rid, n in pick.prefills:
            w = self.waiting.get(rid)
            if w is None or not 1 <= n <= w.remaining:
                raise EngineError(f"scheduler {name!r} picked {n} prompt tokens of {rid!r}, which has "
                                  f"{w.remaining if w else 0} waiting")
            new += w.slot is None
        if new > free:
            raise EngineError(f"scheduler {name!r} admitted {new} prompts with {free} admissible")
        if len({rid for rid, _ in pick.prefills}) < len(pick.prefills) or len(set(pick.decodes)) < len(pick.decodes) \
                or any(s not in self.running for s in pick.decodes):
            raise EngineError(f"scheduler {name!r} picked a request twice or a slot with no waiting token: {pick}")
        if pick.num_tokens > budget:
            raise EngineError(f"scheduler {name!r} picked {pick.num_tokens} tokens (budget {budget})")
        return fit_to_buckets(pick, self.buckets) if self.buckets else pick

    def experts(self, pick: Pick) -> set[int]:
        """The expert ids of the pick's tokens (decodes and prompt chunks); call before ``apply``."""
        s = {int(self.running[slot].expert) for slot in pick.decodes}
        for rid, n in pick.prefills:
            w = self.waiting[rid]
            s.update(int(e) for e in np.unique(w.experts[w.done:w.done + n]))
        return s

    def apply(self, pick: Pick) -> Advance:
        """Advance by one step (see the module docstring)."""
        chunks = []
        for rid, n in pick.prefills:
            w = self.waiting[rid]
            if w.slot is None:
                w.slot = self.free.pop(0)
            chunks.append(Chunk(rid, w.slot, w.done, n, w.done + n >= w.experts.shape[0]))
            w.done += n
            if w.remaining <= 0:
                del self.waiting[rid]
        picked = set(pick.decodes)
        decoded = []
        for s, r in list(self.running.items()):
            if s in picked:
                decoded.append((s, r.request_id))
                del self.running[s]
            else:
                r.waited += 1
        order = {s: i for i, s in enumerate(pick.decodes)}
        return Advance(tuple(chunks), tuple(sorted(decoded, key=lambda d: order[d[0]])))

    def ready(self, slot: int, request_id: str, arrival: int, expert: int, priority: int = 0) -> None:
        """``slot``'s next token (of expert ``expert``) is known and waits to run."""
        self.running[slot] = RunningDecode(slot, request_id, arrival, int(expert), priority=int(priority))

    def release(self, slot: int) -> None:
        """``slot``'s request ended (or left): the slot is free."""
        self.running.pop(slot, None)
        if slot not in self.free:
            self.free.append(slot)
            self.free.sort()

    def remove(self, request_id: str, slot: int | None = None) -> None:
        """Take a request out (cancelled, preempted, ended): out of ``waiting`` if there, and its slot (``slot``,
        else the one its prompt took) released."""
        w = self.waiting.pop(request_id, None)
        if slot is None and w is not None:
            slot = w.slot
        if slot is not None:
            self.release(slot)

    # --- prediction ---------------------------------------------------------------------------------------
    def future(self, scheduler, pick: Pick, budget: int, window: int) -> list[set[int]]:
        """The expert sets of the next ``window`` steps as ``scheduler`` would pick them with no new arrivals,
        after ``pick`` (which has not been applied to this state) runs."""
        q = self.clone()
        q.apply(pick)
        out = []
        for _ in range(window):
            if not q.waiting and not q.running:
                break
            p = q.pick(scheduler, budget)
            if p.num_tokens == 0:
                break
            out.append(q.experts(p))
            q.apply(p)
        return out


def fit_to_buckets(pick: Pick, buckets: tuple[int, ...]) -> Pick:
    """``pick`` with its last prompt chunks shortened (each keeps >= 1 token) so that its tokens equal the
    largest bucket below them, where the tokens over that bucket are fewer than the padding up to the next
    one (the shortened prompts continue next step). Unchanged when no bucket is below or above, or the pick's
    sequences exceed the bucket below (otherwise the chunks can always give up the excess: each sequence
    keeps one token). ``buckets`` ascending."""
    n = pick.num_tokens
    below = [b for b in buckets if b < n]
    above = [b for b in buckets if b >= n]
    if not below or not above or n - below[-1] >= above[0] - n or len(pick.prefills) + len(pick.decodes) > below[-1]:
        return pick
    excess, prefills = n - below[-1], list(pick.prefills)
    for i in range(len(prefills) - 1, -1, -1):
        rid, m = prefills[i]
        take = min(excess, m - 1)
        prefills[i], excess = (rid, m - take), excess - take
    return Pick(prefills=tuple(prefills), decodes=pick.decodes)
