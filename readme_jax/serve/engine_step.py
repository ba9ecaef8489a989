"""One engine step's rows as the runner's packed batch, and its split into resident-expert passes.

    rows = [Row(rid, tokens, experts, start, n, sample, seed, temperature, top_p), ...]
    batch = build_batch(rows, page_table_of, width, routed)           # serve/paged_runner.py's StepBatch
    for group, part in passes(rows, resident, k): ...                  # Read-ME with k resident experts
    out = run_rows(runner, rows, page_table_of, routed, cache, predict)     # [(token, expert)] per row

A row is one sequence's tokens [start, start + n) this step: a decode token (n = 1) or a prompt chunk; its
``tokens`` / ``experts`` are the request's lists (prompt + generated; each token's expert id, -1 for dense).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from readme_jax.serve.expert_cache import LazyFuture, WindowFuture
from readme_jax.serve.paged_runner import StepBatch


@dataclasses.dataclass(frozen=True)
class Row:
    request_id: str
    tokens: list[int]
    experts: list[int]
    start: int
    n: int
    sample: bool               # draw the next token from the last one's logits
    seed: int
    temperature: float
    top_p: float


def build_batch(rows: Sequence[Row], table: Callable[[str], list[int]], width: int, routed: bool) -> StepBatch:
    """The packed StepBatch of ``rows`` (in order): ``table(request_id)`` its page table, padded with the null
    page to ``width`` (the runner's pages per sequence); ``routed``: Read-ME (a sampling row routes its token)."""
    tokens = np.concatenate([np.asarray(r.tokens[r.start:r.start + r.n], np.int32) for r in rows])
    positions = np.concatenate([np.arange(r.start, r.start + r.n, dtype=np.int32) for r in rows])
    experts = np.concatenate([np.asarray(r.experts[r.start:r.start + r.n], np.int32) for r in rows])
    tables = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        t = table(r.request_id)
        tables[i, :len(t)] = t
    sample = np.array([r.sample for r in rows], bool)
    return StepBatch(tokens=tokens, positions=positions, experts=experts,
                     q_lens=np.array([r.n for r in rows], np.int32),
                     kv_lens=np.array([r.start + r.n for r in rows], np.int32), page_tables=tables,
                     sample=sample, route_next=sample & routed, seeds=np.array([r.seed for r in rows], np.int64),
                     temperatures=np.array([r.temperature for r in rows], np.float32),
                     top_ps=np.array([r.top_p for r in rows], np.float32))


def passes(rows: Sequence[Row], resident: set[int], k: int) -> list[tuple[set[int], list[tuple[int, Row]]]]:
    """The step in passes of at most ``k`` experts each: [(the pass's experts, [(row index, row)])].

    A prompt chunk is cut into consecutive segments of at most k distinct experts, one pass each, in order
    (only the last segment samples); single-token rows are grouped by expert, k experts a pass, resident ones
    first, then by id (as the expert cache processes a step's set)."""
    out: list[tuple[set[int], list[tuple[int, Row]]]] = []
    single: dict[int, list[tuple[int, Row]]] = {}
    for j, r in enumerate(rows):
        if r.n == 1:
            single.setdefault(int(r.experts[r.start]), []).append((j, r))
            continue
        seg, group = r.start, set()
        for i in range(r.start, r.start + r.n + 1):
            e = int(r.experts[i]) if i < r.start + r.n else None
            if i == r.start + r.n or (e >= 0 and e not in group and len(group) == k):
                out.append((group, [(j, dataclasses.replace(r, start=seg, n=i - seg,
                                                              sample=r.sample and i == r.start + r.n))]))
                seg, group = i, set()
            if e is not None and e >= 0:
                group.add(e)
    need = sorted((e for e in single if e >= 0), key=lambda e: (e not in resident, e))
    for g in range(0, len(need), k):
        group = set(need[g:g + k])
        out.append((group, [x for e in need[g:g + k] for x in single[e]] + (single.pop(-1, []) if g == 0 else [])))
    if -1 in single:                                   # rows with no expert and no pass of their own
        out.append((set(), single[-1]))
    return out


def run_rows(runner, rows: Sequence[Row], table: Callable[[str], list[int]], routed: bool, cache=None,
             predict: Callable[[], list] | None = None) -> list[tuple[int, int]]:
    """Run a step's rows: one packed ``runner.step``, or with an expert ``cache`` (the resident pool's
    ``serve/expert_cache.ExpertCache``) one step per pass of at most k experts: before each pass the cache
    references its experts (a policy that ``uses_future`` sees the later passes, then ``predict()``'s next steps) and
    the resident pool loads what the cache now holds. Returns (token, its expert) per row (meaningless where
    the row does not sample)."""
    width = runner.max_pages_per_seq
    if cache is None:
        res = runner.step(build_batch(rows, table, width, routed)).result()
        return list(zip(res.tokens.tolist(), res.next_experts.tolist()))
    out = [(-1, -1)] * len(rows)
    plan = passes(rows, cache.resident, cache.capacity)
    for i, (group, part) in enumerate(plan):
        rest = set().union(*(g for g, _ in plan[i + 1:]))
        cache.reference(group, LazyFuture(lambda rest=rest: ([rest] if rest else []) + list(predict()))
                        if cache.policy.uses_future else WindowFuture(()))
        runner.pool.sync(cache.resident)
        res = runner.step(build_batch([r for _, r in part], table, width, routed)).result()
        for (j, r), tok, nxt in zip(part, res.tokens.tolist(), res.next_experts.tolist()):
            if r.sample:
                out[j] = (tok, nxt)
    return out
