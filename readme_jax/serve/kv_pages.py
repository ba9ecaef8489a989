"""Paged KV bookkeeping on the host: a fixed pool of pages, reference counts, a free list, one page table per
sequence, and automatic prefix caching.

    pages = KVPages(num_pages=1024, page_size=16)          # page 0 is the null page, never handed out
    need = pages.admit_cost(prompt)                        # pages this prompt would take from the free list
    hit = pages.open("req-0", prompt)                      # takes the cached prefix + pages for the rest
    ... run tokens [hit.tokens, len(prompt)) ...
    pages.commit("req-0", prompt, experts)                 # full computed pages become cached
    pages.grow("req-0", len(prompt) + 1)                   # False: no free page (the engine preempts)
    pages.close("req-0")                                   # referenced pages back to the free list

One page id names a page in every device pool (the backbone's KV and, for Read-ME, the router's KV), so one
table per sequence serves both. A page is either referenced (by ``ref`` sequence tables) or on the free list;
a free page may still hold a cached prefix page, found by its key, until it is taken for new tokens (LRU
eviction: the free list's front is taken first).

Prefix caching, as vLLM's V1 KV cache manager does it: a full page's key is hash(the previous page's key,
the page's token ids), so a key names the whole prefix up to the page's end. ``open`` walks a prompt's full
pages and takes every page whose key is cached, stopping at the first miss and leaving at least the prompt's
last token to compute (its logits are needed), so a hit is always whole pages and new tokens never write into
a shared page (no copy-on-write). For Read-ME the cached tokens' expert ids are kept with each page (the
router's KV of those tokens is in the same page id), so a hit returns them and the router runs only past the
hit. ``close`` puts a sequence's uncached pages at the front of the free list (nothing to keep) and its cached
pages at the back in reverse order (a prefix's tail is evicted before its head: a later page is useless
without the earlier ones). Keys are 128-bit BLAKE2b digests, not Python's ``hash`` (collisions would serve
another prompt's KV).

Sliding window (Mistral): ``slide`` releases the pages wholly before the window's first position; the table
keeps the null page in their place, so positions still index pages.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Hashable, Sequence

import numpy as np

NULL_PAGE = 0


def page_key(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The cache key of a full page: BLAKE2b-128 over the previous page's key and the page's token ids."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


@dataclasses.dataclass
class PageStats:
    """queries / hits: prompt tokens looked up in the prefix cache and tokens found there (vLLM's counters);
    evictions: cached pages taken for new tokens."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """tokens: prompt tokens found cached (a multiple of page_size); experts: <int32>[tokens] their expert ids
    (Read-ME), or None."""

    tokens: int
    experts: np.ndarray | None


@dataclasses.dataclass
class _Table:
    pages: list[int]
    keys: list[bytes]                 # keys of the sequence's full pages committed so far, in order


class KVPages:
    """See the module docstring. Pure host bookkeeping; the device pools are the runner's."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"KVPages: num_pages must be an integer >= 2 (page 0 is the null page), got {num_pages!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"KVPages: page_size must be an integer >= 1, got {page_size!r}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.ref = [0] * num_pages
        self.key: list[bytes | None] = [None] * num_pages     # a cached page's key
        self.cached: dict[bytes, int] = {}                       # key -> page
        self.experts: dict[int, np.ndarray] = {}                 # cached page -> <int32>[page_size] (Read-ME)
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))
        self.tables: dict[Hashable, _Table] = {}
        self.stats = PageStats()

    # --- queries ------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages that can be taken now (free, cached or not)."""
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of the usable pages referenced by some sequence (vLLM's KV cache usage)."""
        return 1.0 - len(self.free) / (self.num_pages - 1)

    def pages_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_size)

    def table(self, seq: Hashable) -> list[int]:
        return self.tables[seq].pages

    def prefix_keys(self, tokens: Sequence[int]) -> list[bytes]:
        """The keys of the full pages of ``tokens`` a prefix hit may take (all but the last token's; none
        without prefix caching). A caller may keep them for ``cached_tokens`` / ``open`` of the same tokens."""
        keys, parent, ps = [], None, self.page_size
        if self.prefix_caching:
            for i in range((len(tokens) - 1) // ps):
                parent = page_key(parent, tokens[i * ps:(i + 1) * ps])
                keys.append(parent)
        return keys

    def _match(self, tokens: Sequence[int], keys: list[bytes] | None = None) -> tuple[list[int], list[bytes]]:
        """The cached pages (and keys) of the longest cached prefix of ``tokens``, leaving >= 1 token."""
        pages, hit = [], []
        for k in self.prefix_keys(tokens) if keys is None else keys:
            p = self.cached.get(k)
            if p is None:
                break
            pages.append(p)
            hit.append(k)
        return pages, hit

    def cached_tokens(self, keys: list[bytes]) -> int:
        """Tokens a prompt with these ``prefix_keys`` would find cached now."""
        return len(self._match((), keys)[0]) * self.page_size

    def admit_cost(self, tokens: Sequence[int], total: int | None = None, keys: list[bytes] | None = None) -> int:
        """Pages ``open(seq, tokens, total)`` would take from the free list (cached hits on the free list
        included: taking a reference removes them from it). ``keys``: ``prefix_keys(tokens)`` if known."""
        return self._cost(self._match(tokens, keys)[0], len(tokens) if total is None else total)

    def _cost(self, hit: list[int], total: int) -> int:
        return self.pages_for(total) - len(hit) + sum(1 for p in hit if self.ref[p] == 0)

    # --- changes ------------------------------------------------------------------------------------------
    def _take(self) -> int:
        page, _ = self.free.popitem(last=False)
        k = self.key[page]
        if k is not None:                                        # evict a cached page
            del self.cached[k]
            self.key[page] = None
            self.experts.pop(page, None)
            self.stats.evictions += 1
        self.ref[page] = 1
        return page

    def _ref(self, page: int) -> None:
        if self.ref[page] == 0:
            del self.free[page]
        self.ref[page] += 1

    def open(self, seq: Hashable, tokens: Sequence[int], total: int | None = None,
             keys: list[bytes] | None = None) -> PrefixHit:
        """Start a sequence: take the cached prefix of ``tokens`` and pages for ``total`` tokens (default all of
        ``tokens``). Raises MemoryError (nothing taken) if the free list is too short: check ``admit_cost``."""
        if seq in self.tables:
            raise KeyError(f"KVPages.open: sequence {seq!r} already has pages")
        total = len(tokens) if total is None else int(total)
        hit, keys = self._match(tokens, keys)
        need = self._cost(hit, total)
        if need > len(self.free):
            raise MemoryError(f"KVPages.open: {seq!r} needs {need} free pages, {len(self.free)} free")
        for p in hit:
            self._ref(p)
        pages = hit + [self._take() for _ in range(self.pages_for(total) - len(hit))]
        self.tables[seq] = _Table(pages, keys)
        self.stats.queries += len(tokens)
        self.stats.hits += len(hit) * self.page_size
        experts = None
        if hit and hit[0] in self.experts:
            experts = np.concatenate([self.experts[p] for p in hit])
        return PrefixHit(len(hit) * self.page_size, experts)

    def grow(self, seq: Hashable, total: int) -> bool:
        """Enough pages for ``total`` tokens; False (nothing taken) if the free list is too short."""
        t = self.tables[seq]
        need = self.pages_for(total) - len(t.pages)
        if need > len(self.free):
            return False
        t.pages += [self._take() for _ in range(max(need, 0))]
        return True

    def commit(self, seq: Hashable, tokens: Sequence[int], experts: Sequence[int] | None = None) -> None:
        """``tokens``: the sequence's tokens whose KV is now in its pages (from position 0); every full page
        not yet keyed is keyed and cached (with its tokens' ``experts``, Read-ME). A page whose key is already
        cached (computed twice concurrently) stays uncached, as in vLLM."""
        if not self.prefix_caching:
            return
        t, ps = self.tables[seq], self.page_size
        for i in range(len(t.keys), len(tokens) // ps):
            k = page_key(t.keys[-1] if t.keys else None, tokens[i * ps:(i + 1) * ps])
            t.keys.append(k)
            page = t.pages[i]
            if page == NULL_PAGE or k in self.cached or self.key[page] is not None:
                continue
            self.cached[k] = page
            self.key[page] = k
            if experts is not None:
                self.experts[page] = np.asarray(experts[i * ps:(i + 1) * ps], np.int32)

    def _release(self, page: int) -> None:
        self.ref[page] -= 1
        if self.ref[page] == 0:
            self.free[page] = None
            if self.key[page] is None:                           # nothing cached: reuse it first
                self.free.move_to_end(page, last=False)

    def close(self, seq: Hashable) -> None:
        """Release every page of ``seq`` (cached ones stay findable until evicted)."""
        t = self.tables.pop(seq)
        for page in reversed(t.pages):
            if page != NULL_PAGE:
                self._release(page)

    def slide(self, seq: Hashable, first_position: int) -> int:
        """Sliding window: release the pages wholly before ``first_position`` (the null page takes their
        place in the table). Returns how many were released."""
        t, n = self.tables[seq], 0
        for i in range(min(int(first_position) // self.page_size, len(t.pages))):
            if t.pages[i] != NULL_PAGE:
                self._release(t.pages[i])
                t.pages[i] = NULL_PAGE
                n += 1
        return n

    def check(self) -> None:
        """Assert the invariants: each page's reference count equals the tables holding it, a page is free iff
        unreferenced, the cache maps keys and pages one to one. AssertionError naming the first breach."""
        count = [0] * self.num_pages
        for t in self.tables.values():
            for p in t.pages:
                count[p] += 1
        for p in range(1, self.num_pages):
            assert self.ref[p] == count[p], f"page {p}: ref {self.ref[p]}, held by {count[p]} tables"
            assert (self.ref[p] == 0) == (p in self.free), f"page {p}: ref {self.ref[p]}, on free list {p in self.free}"
        assert NULL_PAGE not in self.free and self.ref[NULL_PAGE] == 0
        for k, p in self.cached.items():
            assert self.key[p] == k, f"page {p}: cached under a key it does not hold"
        assert sum(k is not None for k in self.key) == len(self.cached)
