"""Schedulers: Algorithm 1 on hand-built queues, the FCFS orders, chunking and admission, the wait bound on
adversarial queues, and the trace-driven simulator that runs them."""

import numpy as np
import pytest

from readme_jax.errors import ConfigError
from readme_jax.serve.api import Pick, RunningDecode, WaitingPrefill
from readme_jax.serve.queue_state import fit_to_buckets
from readme_jax.serve.schedulers import SCHEDULERS, algorithm1, make_scheduler, must_take
from readme_jax.serve.simulate import SimConfig, make_requests, simulate


def run(experts, waited=None, arrival=None):
    waited = waited or [0] * len(experts)
    arrival = arrival or list(range(len(experts)))
    return [RunningDecode(slot=i, request_id=f"r{i}", arrival=a, expert=e, waited=w)
            for i, (e, w, a) in enumerate(zip(experts, waited, arrival))]


def test_algorithm1_takes_the_largest_expert_groups():
    # expert 2 has 3 tokens (slots 3, 4, 5), expert 1 has 3 (1, 2, 6) -> tie, lower id first: 1 then 2
    queue = run([0, 1, 1, 2, 2, 2, 1, 3])
    assert [r.slot for r in algorithm1(queue, 4)] == [1, 2, 6, 3]
    queue = run([0, 2, 2, 2, 1, 1, 3])                 # 2 has the most: all three, then 1's two, cut to 4
    assert [r.slot for r in algorithm1(queue, 4)] == [1, 2, 3, 4]
    pick = make_scheduler("expert-aware", max_wait=8).pick([], queue, 3, 0)
    assert sorted(pick.decodes) == [1, 2, 3] and pick.prefills == ()


def test_decode_first_and_prefill_first_orders_chunks_and_admission():
    queue = run([0, 1, 2, 3], waited=[0, 2, 2, 1], arrival=[5, 7, 6, 1])
    waiting = [WaitingPrefill("b", 3, np.zeros(10, np.int32)), WaitingPrefill("a", 2, np.zeros(4, np.int32)),
               WaitingPrefill("c", 9, np.zeros(6, np.int32), done=2, slot=7)]
    p = make_scheduler("decode-first").pick(waiting, queue, 10, 1)
    assert p.decodes == (2, 1, 3, 0)                   # longest wait, then earlier arrival
    assert p.prefills == (("c", 4), ("a", 2))          # admitted chunk first, then one new prompt (1 free slot)
    p = make_scheduler("prefill-first").pick(waiting, queue, 10, 2)
    assert p.prefills == (("c", 4), ("a", 4), ("b", 2)) and p.decodes == ()
    p = make_scheduler("prefill-first").pick(waiting, queue, 10, 0)
    assert p.prefills == (("c", 4),) and p.decodes == (2, 1, 3, 0)[:6]
    assert p.num_tokens == 8


def test_expert_aware_prefill_between_urgent_and_grouped_decodes():
    sched = make_scheduler("expert-aware", max_wait=2)
    queue = run([5, 1, 1, 1], waited=[2, 0, 0, 0])     # slot 0 is due (waited = max_wait)
    waiting = [WaitingPrefill("p", 0, np.zeros(2, np.int32))]
    p = sched.pick(waiting, queue, 4, 1)
    assert p.decodes[0] == 0 and p.prefills == (("p", 2),) and p.decodes == (0, 1)
    p = sched.pick([], queue, 2, 0)
    assert p.decodes == (0, 1)                          # the due token first, then expert 1's group


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_priority_orders_admission(name):
    """vLLM's priority (lower first): a later, more urgent prompt is admitted before an earlier one; an admitted
    chunk still goes first."""
    waiting = [WaitingPrefill("early", 0, np.zeros(4, np.int32), priority=1),
               WaitingPrefill("late", 5, np.zeros(4, np.int32), priority=-3),
               WaitingPrefill("going", 9, np.zeros(2, np.int32), done=1, slot=3, priority=7)]
    p = make_scheduler(name).pick(waiting, [], 8, 1)
    assert p.prefills == (("going", 1), ("late", 4))


@pytest.mark.parametrize("name", ["decode-first", "prefill-first", "expert-aware"])
def test_priority_orders_decodes(name):
    """The built-in policies' decode order: among decodes of one expert and equal wait, lower priority first."""
    queue = [RunningDecode(slot=0, request_id="a", arrival=0, expert=2, priority=2),
             RunningDecode(slot=1, request_id="b", arrival=1, expert=2, priority=0),
             RunningDecode(slot=2, request_id="c", arrival=2, expert=2, priority=1)]
    assert make_scheduler(name).pick([], queue, 2, 0).decodes == (1, 2)


def test_expert_aware_wait_bound_outranks_priority():
    """A due decode (waited = max_wait) runs even when every other token has a lower priority value."""
    queue = [RunningDecode(slot=0, request_id="due", arrival=0, expert=1, waited=2, priority=9)] + [
        RunningDecode(slot=i, request_id=f"r{i}", arrival=i, expert=0, priority=-1) for i in range(1, 5)]
    assert make_scheduler("expert-aware", max_wait=2).pick([], queue, 2, 0).decodes == (0, 1)


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_dense_model_expert_minus_one(name):
    queue = run([-1] * 6)
    p = make_scheduler(name).pick([WaitingPrefill("x", 0, np.full(3, -1, np.int32))], queue, 4, 1)
    assert p.num_tokens == 4


def test_must_take_counts_deadlines():
    assert must_take(np.array([0, 0, 0, 5]), 2) == 3        # three due now: all of them (budget is a cap later)
    assert must_take(np.array([2, 2, 2, 2, 2]), 2) == 1     # 5 due within 3 steps, 2 per step: one now
    assert must_take(np.array([1, 1, 1, 1, 1]), 2) == 3     # infeasible: 3 now (capped by the budget later)
    assert must_take(np.array([3, 3]), 2) == 0


def _adversarial_walk(sched, slots, budget, steps, seed):
    """Each new token's expert is the one with the fewest waiting tokens (Algorithm 1 likes it least)."""
    rng = np.random.default_rng(seed)
    queue = run(list(rng.integers(0, 3, slots)))
    worst = 0
    for _ in range(steps):
        worst = max(worst, max(r.waited for r in queue))
        picked = set(sched.pick([], queue, budget, 0).decodes)
        counts = np.bincount([r.expert for r in queue if r.slot not in picked], minlength=4)
        for r in queue:
            if r.slot in picked:
                r.waited, r.expert = 0, int(np.argmin(counts)) if rng.random() < 0.8 else 0
            else:
                r.waited += 1
    return worst


@pytest.mark.parametrize("slots,budget,max_wait", [(12, 4, 2), (9, 3, 2), (16, 2, 7), (10, 5, 1)])
def test_wait_bound_holds_on_adversarial_queues(slots, budget, max_wait):
    assert slots <= budget * (max_wait + 1)
    sched = make_scheduler("expert-aware", max_wait=max_wait)
    for seed in range(5):
        assert _adversarial_walk(sched, slots, budget, 200, seed) <= max_wait


def test_without_the_bound_the_adversary_starves_a_token():
    class Alg1Only:
        name = "alg1"

        def pick(self, waiting, running, budget, free_slots):
            from readme_jax.serve.api import Pick
            return Pick(decodes=tuple(r.slot for r in algorithm1(running, budget)))

    assert _adversarial_walk(Alg1Only(), 12, 4, 200, 0) > 2


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown"):
        make_scheduler("shortest-job")
    with pytest.raises(ConfigError, match="max_wait"):
        make_scheduler("expert-aware", max_wait=-1)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \[.max_wait.\]"):
        make_scheduler("decode-first", max_wait=3)
    with pytest.raises(ValueError, match="budget"):
        make_scheduler("decode-first").pick([], [], 0, 0)


def _requests(n, seed=0, experts=4):
    rng = np.random.default_rng(seed)
    prompt, output = rng.integers(1, 12, n), rng.integers(1, 20, n)
    ex = [rng.integers(0, experts, p + g - 1) for p, g in zip(prompt, output)]
    return make_requests(np.sort(rng.uniform(0, 30, n)), prompt, output, ex)


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_simulator_serves_every_token_once(name):
    reqs = _requests(40)
    r = simulate(reqs, SCHEDULERS.make_from(name, {"max_wait": 3}),
                 SimConfig(slots=8, budget=4, capacity=2, policy="belady"))
    assert np.isfinite(r.finish).all() and (r.ttft > 0).all()
    assert r.decode_tokens.sum() == sum(q.output - 1 for q in reqs)
    assert r.cache.hits + r.cache.misses == sum(len(s) for s in r.sets)
    assert (r.decode_experts <= np.minimum(r.decode_tokens, 4)).all()


def test_fit_to_buckets_gives_back_a_small_excess_from_the_last_chunks():
    B = (16, 32, 64, 128, 256)
    seven = tuple(range(7))
    assert fit_to_buckets(Pick(prefills=(("a", 128),), decodes=seven), B) == Pick((("a", 121),), seven)
    assert fit_to_buckets(Pick((("a", 100), ("b", 40)), seven), B) == Pick((("a", 100), ("b", 21)), seven)
    assert fit_to_buckets(Pick((("a", 125), ("b", 6)), seven), B) == Pick((("a", 120), ("b", 1)), seven)
    unchanged = [Pick((("a", 200),), seven),             # 207 tokens: 79 over 128, 49 under 256 -> pad
                 Pick((("a", 128),)),                     # exactly a bucket
                 Pick((("a", 2), ("b", 2)), tuple(range(130))),   # 132 sequences: more than 128
                 Pick((("a", 10),)),                      # no bucket below
                 Pick((("a", 300),))]                     # no bucket above (the runner raises, not this)
    for p in unchanged:
        assert fit_to_buckets(p, B) == p


def test_simulator_with_buckets_serves_every_token_once():
    reqs = _requests(40, seed=2)
    r = simulate(reqs, make_scheduler("decode-first"), SimConfig(slots=8, budget=16, token_buckets=(4, 8, 16)))
    assert np.isfinite(r.finish).all()
    assert r.decode_tokens.sum() == sum(q.output - 1 for q in reqs)


def test_simulator_expert_aware_touches_fewer_experts():
    reqs = _requests(60, seed=1)
    cfg = SimConfig(slots=16, budget=4, instant_prefill=True)
    fcfs = simulate(reqs, make_scheduler("decode-first"), cfg)
    ea = simulate(reqs, make_scheduler("expert-aware", max_wait=8), cfg)
    busy = (fcfs.running >= 16) & (fcfs.decode_tokens > 0)
    busy_ea = (ea.running >= 16) & (ea.decode_tokens > 0)
    assert ea.decode_experts[busy_ea].mean() < fcfs.decode_experts[busy].mean()
