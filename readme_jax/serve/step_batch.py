"""What one packed step takes and gives (``serve/paged_runner.py``): the host's StepBatch, the dispatched
StepHandle and its host StepResult. Dimension names: n tokens, s sequences, Mp pages per sequence."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass
class StepBatch:
    """One step's work, host NumPy (see docs/architecture.md, Serving). n tokens of s sequences, each
    sequence's tokens contiguous and in order.

    tokens, positions, experts <int32>[n] (experts -1: dense / none); q_lens, kv_lens <int32>[s];
    page_tables <int32>[s, <= Mp] (0 = none); sample, route_next <bool>[s]; seeds <int>[s];
    temperatures, top_ps <f32>[s]; logprobs <bool>[s] or None: the sampling rows that want the sampled token's
    log-probability and the row's top ``MAX_LOGPROBS`` (None / all False: no row pays for them).

    Logit processors (each None: off for every row): top_ks <int32>[s] (0 / -1: off), min_ps <f32>[s];
    proc_rows <int32>[s] (the device row of a sequence using a penalty or logit_bias, -1: none; see
    ``step_sampling``), with presence / frequency / repetition <f32>[s] and prompt_lens <int32>[s] (input
    tokens at positions >= it are output tokens). prompt_logprobs <bool>[s]: the sequences whose every token's
    successor log-probability is returned (echo), next_tokens <int32>[n] that successor of each token."""

    tokens: np.ndarray
    positions: np.ndarray
    experts: np.ndarray
    q_lens: np.ndarray
    kv_lens: np.ndarray
    page_tables: np.ndarray
    sample: np.ndarray
    route_next: np.ndarray
    seeds: np.ndarray
    temperatures: np.ndarray
    top_ps: np.ndarray
    logprobs: np.ndarray | None = None
    top_ks: np.ndarray | None = None
    min_ps: np.ndarray | None = None
    proc_rows: np.ndarray | None = None
    presence: np.ndarray | None = None
    frequency: np.ndarray | None = None
    repetition: np.ndarray | None = None
    prompt_lens: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None
    next_tokens: np.ndarray | None = None


@dataclasses.dataclass
class StepResult:
    """tokens <int32>[s] (garbage where sample is False); next_experts <int32>[s] (-1 where not routed);
    logprobs <f32>[s] and ranks <int32>[s] (the sampled token's), top_ids <int32>[s, MAX_LOGPROBS]
    and top_logprobs <f32>[s, MAX_LOGPROBS] (descending), all read from one log-softmax of the raw logits
    (``sampling.token_logprobs``); zeros / -inf on the rows that did not ask. prompt_logprobs <f32>[n],
    prompt_ranks <int32>[n], prompt_top_ids <int32>[n, MAX_LOGPROBS], prompt_top_logprobs <f32>[n, MAX_LOGPROBS]:
    each token's successor (``StepBatch.next_tokens``), when the batch asked for prompt logprobs (else None)."""

    tokens: np.ndarray
    next_experts: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    prompt_logprobs: np.ndarray | None = None
    prompt_ranks: np.ndarray | None = None
    prompt_top_ids: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None


class StepHandle:
    """A dispatched step; ``result()`` blocks for its outputs (copied to the host asynchronously)."""

    def __init__(self, tokens: jax.Array, next_experts: jax.Array, num_seqs: int, logprobs: tuple,
                 prompt: tuple | None = None, num_tokens: int = 0):
        self._out, self._s = (tokens, next_experts) + tuple(logprobs), num_seqs
        self._prompt, self._n = prompt, num_tokens          # fetched only when the batch asked for them
        for a in self._out + (prompt or ()):
            a.copy_to_host_async()

    def done(self) -> bool:
        return all(a.is_ready() for a in self._out + (self._prompt or ()))

    def result(self) -> StepResult:
        prompt = [np.asarray(a)[:self._n] for a in self._prompt] if self._prompt is not None else []
        return StepResult(*(np.asarray(a)[:self._s] for a in self._out), *prompt)
