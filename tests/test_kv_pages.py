"""The host page allocator and prefix cache: reference counts, prefix hits, LRU eviction, no leak."""

import numpy as np
import pytest

from readme_jax.serve.kv_pages import NULL_PAGE, KVPages, page_key


def test_alloc_grow_close_refcounts_and_no_leak():
    pages = KVPages(num_pages=9, page_size=4, prefix_caching=False)
    assert pages.num_free == 8 and pages.usage == 0.0
    hit = pages.open("a", list(range(10)))                 # 10 tokens: 3 pages
    assert hit.tokens == 0 and len(pages.table("a")) == 3 and NULL_PAGE not in pages.table("a")
    assert pages.grow("a", 12) and len(pages.table("a")) == 3    # still fits
    assert pages.grow("a", 13) and len(pages.table("a")) == 4
    pages.open("b", list(range(16)))                       # 4 more: the pool is full
    assert pages.num_free == 0 and pages.usage == 1.0
    assert not pages.grow("b", 17) and len(pages.table("b")) == 4      # nothing taken on failure
    with pytest.raises(MemoryError):
        pages.open("c", [1])
    assert "c" not in pages.tables
    pages.check()
    pages.close("a")
    assert pages.num_free == 4 and pages.grow("b", 17)
    pages.close("b")
    pages.check()
    assert pages.num_free == 8 and not pages.tables and all(r == 0 for r in pages.ref)


def test_prefix_hit_takes_cached_full_pages_and_keeps_the_last_token():
    pages = KVPages(num_pages=17, page_size=4)
    prompt = list(range(10))                               # 2 full pages + 2 tokens
    experts = np.arange(10, dtype=np.int32) % 3
    assert pages.open("a", prompt).tokens == 0
    pages.commit("a", prompt, experts)
    a_pages = list(pages.table("a"))
    assert len(pages.cached) == 2
    hit = pages.open("b", prompt[:9] + [99])               # same two full pages, another tail
    assert hit.tokens == 8 and hit.experts.tolist() == experts[:8].tolist()
    assert pages.table("b")[:2] == a_pages[:2] and pages.table("b")[2] != a_pages[2]
    assert pages.ref[a_pages[0]] == 2 and pages.ref[a_pages[2]] == 1
    assert pages.open("c", prompt[:8]).tokens == 4         # 8 tokens = 2 full pages, but the last token runs
    assert pages.open("d", [5] + prompt[1:]).tokens == 0   # a different first page: nothing (keys chain)
    assert pages.stats.queries == 10 + 10 + 8 + 10 and pages.stats.hits == 8 + 4
    pages.check()
    for s in "abcd":
        pages.close(s)
    pages.check()
    assert pages.num_free == 16 and len(pages.cached) == 2 and all(r == 0 for r in pages.ref)
    # cached pages survive close and are found again
    assert pages.open("e", prompt).tokens == 8
    pages.close("e")


def test_no_prefix_caching_never_hits():
    pages = KVPages(num_pages=9, page_size=2, prefix_caching=False)
    pages.open("a", [1, 2, 3, 4, 5])
    pages.commit("a", [1, 2, 3, 4, 5])
    assert not pages.cached and pages.open("b", [1, 2, 3, 4, 5]).tokens == 0
    assert pages.stats.hits == 0 and pages.stats.queries == 10


def test_eviction_takes_unkept_pages_first_then_lru_and_prefix_tails_first():
    pages = KVPages(num_pages=7, page_size=2)
    pages.open("old", [1, 2, 3, 4, 5])                      # 3 pages, 2 full
    pages.commit("old", [1, 2, 3, 4])
    old = list(pages.table("old"))
    pages.open("new", [7, 8, 9, 10, 11])
    pages.commit("new", [7, 8, 9, 10])
    new = list(pages.table("new"))
    pages.close("old")                                     # free list: old's partial page first, then the
    pages.close("new")                                     # cached pages, least recently released first
    assert list(pages.free) == [new[2], old[2], old[1], old[0], new[1], new[0]]
    assert pages.open("x", [0] * 4).tokens == 0 and pages.table("x") == [new[2], old[2]]
    assert pages.stats.evictions == 0
    pages.grow("x", 6)                                      # evicts old's tail page before its head
    assert pages.table("x")[2] == old[1] and pages.stats.evictions == 1
    assert pages.open("y", [1, 2, 3, 4, 5]).tokens == 2      # old's head page is still cached
    pages.check()
    pages.close("x")
    pages.close("y")
    pages.check()


def test_hit_on_free_list_counts_in_admit_cost():
    pages = KVPages(num_pages=4, page_size=2)
    pages.open("a", [1, 2, 3])
    pages.commit("a", [1, 2, 3])
    pages.close("a")
    assert pages.admit_cost([1, 2, 3]) == 2                 # the cached page leaves the free list, plus one
    assert pages.admit_cost([1, 2, 3], total=6) == 3
    with pytest.raises(MemoryError):
        pages.open("b", [1, 2, 3], total=7)
    assert pages.open("b", [1, 2, 3], total=6).tokens == 2 and pages.num_free == 0
    pages.close("b")
    pages.check()


def test_concurrent_duplicate_page_stays_uncached_and_slide_releases_window():
    pages = KVPages(num_pages=9, page_size=2)
    pages.open("a", [1, 2, 3])
    pages.open("b", [1, 2, 3])                              # both computed page [1, 2] at once
    pages.commit("a", [1, 2, 3])
    pages.commit("b", [1, 2, 3])
    assert len(pages.cached) == 1 and pages.cached[page_key(None, [1, 2])] == pages.table("a")[0]
    assert pages.grow("b", 8) and pages.slide("b", 5) == 2  # positions 0..3 fall out of the window
    assert pages.table("b")[:2] == [NULL_PAGE, NULL_PAGE] and pages.slide("b", 5) == 0
    pages.commit("b", [1, 2, 3, 4, 5, 6])                   # keys chain on past released pages
    pages.check()
    pages.close("a")
    pages.close("b")
    pages.check()
    assert pages.num_free == 8


def test_random_workload_keeps_invariants():
    rng = np.random.default_rng(0)
    pages = KVPages(num_pages=33, page_size=4)
    live: dict[int, list[int]] = {}
    shared = rng.integers(0, 50, 12).tolist()
    for step in range(400):
        op = rng.integers(3)
        if op == 0 and len(live) < 6:
            toks = (shared if rng.random() < 0.5 else []) + rng.integers(0, 50, int(rng.integers(1, 20))).tolist()
            if pages.admit_cost(toks) <= pages.num_free:
                hit = pages.open(step, toks)
                assert hit.tokens % 4 == 0 and hit.tokens < len(toks)
                live[step] = toks
                pages.commit(step, toks)
        elif op == 1 and live:
            s = list(live)[int(rng.integers(len(live)))]
            toks = live[s] + [int(rng.integers(50))]
            if pages.grow(s, len(toks)):
                live[s] = toks
                pages.commit(s, toks)
        elif live:
            pages.close(list(live)[int(rng.integers(len(live)))])
            live.pop(next(s for s in live if s not in pages.tables))
        pages.check()
    for s in list(live):
        pages.close(s)
    pages.check()
    assert pages.num_free == 32 and all(r == 0 for r in pages.ref) and pages.stats.hits > 0
