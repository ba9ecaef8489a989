"""One engine step's rows as the runner's packed batch, and its split into resident-expert passes.

    rows = [Row(rid, tokens, experts, start, n, sample, seed, temperature, top_p, params=..., proc_row=...), ...]
    batch = build_batch(rows, page_table_of, width, routed)           # serve/paged_runner.py's StepBatch
    for group, part in passes(rows, resident, k): ...                  # Read-ME with k resident experts
    out = run_rows(runner, rows, page_table_of, routed, cache, predict)     # [RowResult] per row

A row is one sequence's tokens [start, start + n) this step: a decode token (n = 1) or a prompt chunk; its
``tokens`` / ``experts`` are the request's lists (prompt + generated; each token's expert id, -1 for dense).
``params`` carries the request's logit processors and logprobs (``step_sampling``): a batch whose rows use none
builds none of their arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from readme_jax.sampling import SamplingParams
from readme_jax.serve.expert_cache import LazyFuture, WindowFuture
from readme_jax.serve.paged_runner import StepBatch

#: A token's log-probability, its k most likely alternatives and its rank (1: the most likely; vLLM's):
#: (logprob, ((token id, logprob), ...), rank).
TokenLogprob = tuple[float, tuple[tuple[int, float], ...], int]


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
    params: SamplingParams | None = None     # processors / logprobs (None: neutral)
    proc_row: int = -1                       # the device row of its penalty / logit_bias state (-1: none)
    prompt_len: int = 0                      # tokens at positions >= it are generated (penalty counts)
    prompt_logprobs: bool = False            # return each token's successor log-probability (echo)


@dataclasses.dataclass
class RowResult:
    """A row's outcome: the sampled token and its expert (meaningless where the row does not sample), the
    sampled token's TokenLogprob (params.logprobs set), and the TokenLogprob of the successor of each of the
    row's tokens (prompt_logprobs set)."""

    token: int
    expert: int
    logprob: TokenLogprob | None = None
    prompt: list[TokenLogprob] | None = None


def _entry(lp, ids, lps, rank, k: int) -> TokenLogprob:
    return float(lp), tuple(zip(ids[:k].tolist(), lps[:k].tolist())), int(rank)


def _processor_arrays(rows: Sequence[Row]) -> dict:
    """The StepBatch's optional processor / logprob arrays of ``rows`` (empty when no row uses one)."""
    params = [r.params for r in rows]
    out = {}
    if any(p is not None and (p.logprobs is not None) for p in params):
        out["logprobs"] = np.array([p is not None and p.logprobs is not None and r.sample
                                    for p, r in zip(params, rows)])
    if any(p is not None and p.uses_processors for p in params):
        def field(name, default):
            return [default if p is None else getattr(p, name) for p in params]
        out.update(top_ks=np.array(field("top_k", 0), np.int32), min_ps=np.array(field("min_p", 0.0), np.float32),
                   presence=np.array(field("presence_penalty", 0.0), np.float32),
                   frequency=np.array(field("frequency_penalty", 0.0), np.float32),
                   repetition=np.array(field("repetition_penalty", 1.0), np.float32),
                   proc_rows=np.array([r.proc_row for r in rows], np.int32),
                   prompt_lens=np.array([r.prompt_len for r in rows], np.int32))
    if any(r.prompt_logprobs for r in rows):
        out["prompt_logprobs"] = np.array([r.prompt_logprobs for r in rows])
        out["next_tokens"] = np.concatenate([np.asarray((r.tokens + [0])[r.start + 1:r.start + r.n + 1], np.int32)
                                             for r in rows])
    return out


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
                     top_ps=np.array([r.top_p for r in rows], np.float32), **_processor_arrays(rows))


def _results(rows: Sequence[Row], res) -> list[RowResult]:
    """Each row's RowResult from the runner's StepResult of a batch of ``rows`` (in order)."""
    out, offset = [], 0
    for i, r in enumerate(rows):
        p = r.params
        lp = _entry(res.logprobs[i], res.top_ids[i], res.top_logprobs[i], res.ranks[i], p.logprobs) \
            if p is not None and p.logprobs is not None and r.sample else None
        prompt = [_entry(res.prompt_logprobs[t], res.prompt_top_ids[t], res.prompt_top_logprobs[t],
                         res.prompt_ranks[t], p.prompt_logprobs)
                  for t in range(offset, offset + r.n)] if r.prompt_logprobs else None
        out.append(RowResult(int(res.tokens[i]), int(res.next_experts[i]), lp, prompt))
        offset += r.n
    return out


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
             predict: Callable[[], list] | None = None) -> list[RowResult]:
    """Run a step's rows: one packed ``runner.step``, or with an expert ``cache`` (the resident pool's
    ``serve/expert_cache.ExpertCache``) one step per pass of at most k experts: before each pass the cache
    references its experts (a policy that ``uses_future`` sees the later passes, then ``predict()``'s next steps) and
    the resident pool loads what the cache now holds. Returns a RowResult per row (a prompt chunk cut into
    passes gets its passes' prompt logprobs in order)."""
    width = runner.max_pages_per_seq
    if cache is None:
        return _results(rows, runner.step(build_batch(rows, table, width, routed)).result())
    out = [RowResult(-1, -1, None, [] if r.prompt_logprobs else None) for r in rows]
    plan = passes(rows, cache.resident, cache.capacity)
    for i, (group, part) in enumerate(plan):
        rest = set().union(*(g for g, _ in plan[i + 1:]))
        cache.reference(group, LazyFuture(lambda rest=rest: ([rest] if rest else []) + list(predict()))
                        if cache.policy.uses_future else WindowFuture(()))
        runner.pool.sync(cache.resident)
        rows_ = [r for _, r in part]
        got = _results(rows_, runner.step(build_batch(rows_, table, width, routed)).result())
        for (j, r), g in zip(part, got):
            if r.sample:
                out[j].token, out[j].expert, out[j].logprob = g.token, g.expert, g.logprob
            if g.prompt is not None:
                out[j].prompt += g.prompt
    return out
