"""Expert cache: the binding reference definition, Belady's optimality (a textbook string, an exhaustive
search, 100 random strings against the other policies) and windowed Belady with an unbounded window."""

import itertools

import numpy as np
import pytest

from readme_jax.errors import ConfigError
from readme_jax.serve.expert_cache import POLICIES, ExpertCache, WindowFuture, make_policy, offline_optimum, replay

# Silberschatz et al., Operating System Concepts, ch. 10: 3 frames -> OPT 9, LRU 12, FIFO 15 page faults
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_textbook_string_known_miss_counts():
    trace = [{x} for x in TEXTBOOK]
    assert replay(trace, make_policy("belady"), 3).misses == 9
    assert replay(trace, make_policy("lru"), 3).misses == 12
    assert replay(trace, make_policy("fifo"), 3).misses == 15


def _optimum(trace, k):
    """Fewest misses over every victim choice (exhaustive; tiny traces only)."""
    best = [np.inf]

    def go(t, cache, misses):
        if misses >= best[0]:
            return
        if t == len(trace):
            best[0] = misses
            return
        need = trace[t]
        cache = set(cache)
        missing = sorted(need - cache)
        if len(cache) + len(missing) <= k:
            return go(t + 1, cache | need, misses + len(missing))
        must_go = len(cache) + len(missing) - k
        for victims in itertools.combinations(sorted(cache - need), must_go):
            go(t + 1, (cache - set(victims)) | need, misses + len(missing))

    go(0, set(), 0)
    return best[0]


def _random_trace(rng, steps, experts, max_set):
    return [set(rng.choice(experts, size=rng.integers(1, max_set + 1), replace=False).tolist())
            for _ in range(steps)]


def test_belady_matches_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for _ in range(20):
        trace = _random_trace(rng, 9, 5, 2)
        assert replay(trace, make_policy("belady"), 3).misses == _optimum(trace, 3) == offline_optimum(trace, 3)
    assert offline_optimum([{x} for x in TEXTBOOK], 3) == 9


def test_multi_pass_steps_belady_is_not_optimal_the_search_is():
    trace = [{0, 1, 2}, {0, 1, 2}, {1, 2}, {1, 2}]
    assert replay(trace, make_policy("belady"), 2).misses == 5 and offline_optimum(trace, 2) == 4


def test_offline_belady_never_worse_on_100_random_strings():
    """|S| <= k: offline Belady is the optimum; with multi-pass steps the exact search bounds everything."""
    rng = np.random.default_rng(1)
    strictly_better = 0
    for i in range(100):
        E = int(rng.integers(3, 8))
        k = int(rng.integers(1, E))
        multi = i % 2 == 1
        trace = _random_trace(rng, 40, E, min(3, E) if multi else min(3, k))
        belady = replay(trace, make_policy("belady"), k).misses
        others = [replay(trace, POLICIES.make_from(n, {"seed": i}), k).misses
                  for n in POLICIES.names() if n != "belady"]
        best = offline_optimum(trace, k)
        assert best <= min(others + [belady]), (i, best, belady, others)
        if not multi:
            assert belady == best <= min(others), (i, belady, others)
            strictly_better += belady < min(others)
    assert strictly_better > 25


def test_unbounded_window_equals_offline_optimum():
    rng = np.random.default_rng(2)
    differs = 0
    for _ in range(20):
        trace = _random_trace(rng, 60, 6, 3)
        offline = replay(trace, make_policy("belady"), 3)
        assert replay(trace, make_policy("belady"), 3, window=len(trace)).misses == offline.misses
        assert replay(trace, make_policy("belady"), 3, futures=[trace[t + 1:] for t in range(len(trace))]
                      ).misses == offline.misses
        differs += replay(trace, make_policy("belady"), 3, window=1).misses != offline.misses
    assert differs > 0                               # the window matters, so the equality is not vacuous


def test_reference_definition_and_counters():
    cache = ExpertCache(2, make_policy("lru"), num_layers=3, expert_bytes=10.0)
    cache.reference({0, 1})
    r = cache.reference({1, 2})                     # C = {0, 1}: hit 1, miss 2, victim only from C \ S = {0}
    assert (r.hits, r.misses, r.passes, r.loaded) == (1, 1, 1, (2,)) and cache.resident == {1, 2}
    r = cache.reference({0, 1, 2, 3})               # |S| > k: ceil(4 / 2) passes, computed experts recycled
    assert (r.hits, r.misses, r.passes) == (2, 2, 2)
    s = cache.stats
    assert (s.references, s.hits, s.misses, s.bytes_moved) == (9, 9, 15, 150.0)
    assert s.hit_ratio == pytest.approx(9 / 24)


def test_belady_tie_rule_and_future():
    cache = ExpertCache(2, make_policy("belady"))
    cache.reference({0})
    cache.reference({1})
    cache.reference({2}, WindowFuture([{0}]))       # 1 unused in the window, 0 used next -> evict 1
    assert cache.resident == {0, 2}
    cache.reference({3}, WindowFuture([]))          # both unused: least recently used (0) goes
    assert cache.resident == {2, 3}


def test_bad_inputs():
    with pytest.raises(ConfigError, match="capacity"):
        ExpertCache(0, make_policy("lru"))
    with pytest.raises(ConfigError, match="unknown"):
        make_policy("arc")
