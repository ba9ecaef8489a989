"""The engine's page-aware scheduling (a mixin of ``serve/engine.py``'s Engine, on its queue, requests, pages
and runner): admission by free pages, preemption by recompute, opening a prompt's pages (prefix hit, Read-ME
routing, an n > 1 sample's copy of its sibling's prompt pages), and the step's pick with pages.

Admission: the scheduler's ``free_slots`` is the number of waiting prompts (prefill order: priority, then FCFS)
whose pages fit after one page is reserved for every running decode that needs one. Preemption: when a picked
decode token needs a page and none is free, the sequence not yet scheduled this step of the highest priority value
(vLLM's: the least urgent), the latest-arrived among equals, gives up its pages and slot and waits again
(keeping its arrival) to recompute its prompt and all its generated tokens but the last, which is its pending
decode token again.
"""

from __future__ import annotations

import numpy as np

from readme_jax.serve.api import Pick, WaitingPrefill
from readme_jax.serve.engine_request import EngineRequest
from readme_jax.serve.schedulers import prefill_order


class PagedScheduling:
    """Needs from the engine: ``pages`` (KVPages), ``runner`` (PagedRunner), ``_queue`` (QueueState), ``_reqs``,
    ``config``, ``scheduler``, ``lookahead``, ``sliding_window``, ``preemptions``, ``_preempted``, ``_wait(req)``,
    ``_dequeue(n)``."""

    def _admissible(self) -> int:
        """New prompts (FCFS) whose pages fit, after a page for every running decode that needs one."""
        free = self.pages.num_free - sum(
            1 for d in self._queue.running.values()
            if self.pages.pages_for(self._reqs[d.request_id].computed + 1 + self.lookahead)
            > len(self.pages.table(d.request_id)))
        n = 0
        for w in prefill_order(self._queue.waiting.values()):
            if w.slot is not None:
                continue
            req = self._reqs[w.request_id]
            free -= self.pages.admit_cost(req.tokens[:req.target], self._page_need(req), keys=req.keys)
            if free < 0:
                break
            n += 1
        return n

    def _page_need(self, req: EngineRequest) -> int:
        """Tokens a newly opened sequence needs pages for: its prefill, and the router's lookahead entry."""
        return req.target + self.lookahead

    def _preempt(self, req: EngineRequest) -> None:
        """Free ``req``'s pages and slot; it waits again to recompute its tokens (see the module doc)."""
        self.pages.close(req.id)
        self._queue.remove(req.id, req.slot)
        req.slot, req.computed = None, 0
        req.target, req.keys = len(req.tokens) - (1 if req.generated else 0), None
        self._wait(req)
        self._preempted.append(req.id)
        self._dequeue(+1)
        self.preemptions += 1

    def _grow(self, req: EngineRequest, total: int, protected: set[str]) -> bool:
        """Pages for ``total`` tokens of ``req``, preempting other sequences (highest priority value, then latest
        arrival; never those in ``protected``) while none is free. False: ``req`` itself was preempted."""
        while not self.pages.grow(req.id, total):
            holders = [r for r in self._reqs.values() if r.id in self.pages.tables and r.id not in protected]
            victim = max(holders, key=lambda r: (r.priority, r.arrival_step, r.id), default=req)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _open(self, req: EngineRequest, w: WaitingPrefill) -> bool:
        """Open an admitted prompt's pages (its cached prefix is taken, not prefilled) and, for Read-ME, route
        the tokens past the prefix (the router's KV goes into the same pages). False: the pages no longer fit
        (a hit was evicted this step); it stays waiting."""
        try:
            hit = self.pages.open(req.id, req.tokens[:req.target], self._page_need(req), keys=req.keys)
        except MemoryError:
            return False
        req.computed = w.done = hit.tokens
        if not req.generated:                        # a fresh prompt: its experts are the router's
            req.experts = (hit.experts.tolist() if hit.experts is not None else [-1] * hit.tokens) + \
                [-1] * (req.target - hit.tokens)
        end = len(req.tokens)                        # the router covers every known token, the pending one too
        if self.lookahead and end > hit.tokens:
            ids = self.runner.route(np.asarray(req.tokens[hit.tokens:end], np.int32),
                                    np.arange(hit.tokens, end, dtype=np.int32), np.array([end - hit.tokens]),
                                    np.array([end]), np.asarray([self.pages.table(req.id)], np.int32))
            if not req.generated:
                req.experts[hit.tokens:] = ids.tolist()
        w.experts = np.asarray(req.experts[:req.target], np.int32)
        req.computed = w.done = self._copy_from_leader(req, hit.tokens)
        return True

    def _leader_prefilling(self, req: EngineRequest) -> bool:
        """``req`` follows a sibling whose prompt is not yet in its pages (and may share them: prefix caching)."""
        lead = self._reqs.get(req.follows) if req.follows is not None else None
        return (lead is not None and self.config.prefix_caching and req.reads_cache and lead.prompt == req.prompt
                and not lead.generated)

    def _copy_from_leader(self, req: EngineRequest, start: int) -> int:
        """An n > 1 sample (``req.follows``) whose sibling holds the same prompt's KV: the pages past the prefix
        hit, the partly filled last one included, are copied from the sibling's (copy-on-write: the copy is its
        own), so only the prompt's last token runs again (to sample). Not for a request that must run every token
        (``reads_cache`` False: penalty counts, prompt logprobs). Returns the tokens now computed."""
        lead = self._reqs.get(req.follows) if req.follows is not None else None
        last = req.target - 1
        if (lead is None or req.generated or not req.reads_cache or lead.prompt != req.prompt
                or lead.id not in self.pages.tables or self.sliding_window is not None     # slid pages are gone
                or lead.computed < last or start >= last):
            return start
        ps = self.pages.page_size
        src, dst = self.pages.table(lead.id), self.pages.table(req.id)
        for i in range(start // ps, (last - 1) // ps + 1):
            self.runner.copy_page(src[i], dst[i])
        return last

    def _schedule(self) -> Pick:
        """This step's pick with pages: every picked decode gets the page of its token (preempting while none
        is free), every admitted prompt opens its pages. Returns the pick that runs."""
        pick = self._queue.pick(self.scheduler, self.config.max_num_batched_tokens, self._admissible())
        protected, decodes, prefills = set(), [], []
        for slot in pick.decodes:
            d = self._queue.running.get(slot)
            if d is None:                            # preempted by an earlier decode of this step
                continue
            req = self._reqs[d.request_id]
            if self._grow(req, req.computed + 1 + self.lookahead, protected):
                protected.add(req.id)
                decodes.append(slot)
        for rid, n in pick.prefills:
            w = self._queue.waiting[rid] if rid not in self._preempted else None
            if w is None or (w.slot is None and not self._open(self._reqs[rid], w)):
                continue                             # preempted this step, or its pages no longer fit
            if w.remaining > 0:
                prefills.append((rid, min(n, w.remaining)))
                protected.add(rid)
        return Pick(prefills=tuple(prefills), decodes=tuple(decodes))
