"""Per-window NLL and top-1 predictions of a model on sampled held-out windows, and the statistics over them.

    fn = make_window_fn(model)                          # jitted: ids, targets -> (nll [B, T], top1 [B, T])
    s = score_sample(fn, sample, batch_size=4)          # {"nll": [W] sums, "tokens": [W], "top1": [W][T]}
    perplexity_ci(s)                                    # ppl with a 95% bootstrap CI over windows
    nll_difference(s_a, s_b)                            # paired per-token NLL diff a - b, CI, ppl ratio
    top1_agreement(s_a, s_ref, sample.weights)          # share of scored tokens where argmaxes agree, CI

One forward per batch gives both numbers: the logits' log-softmax at the target (the NLL) and their argmax
(the next token the model would pick greedily). Units of every bootstrap are windows
(:mod:`readme_jax.eval.sampler`), weighted by their scored tokens, so the statistic is per token while
correlated tokens of one window are resampled together. Dimension names: W windows, T tokens, B batch, V vocab.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.eval.paired import bootstrap_mean, paired_bootstrap
from readme_jax.eval.sampler import DomainSample
from readme_jax.model.head_loss import nll_from_logits

WindowFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_and_top1(graphdef, state, ids, targets):
    logits = nnx.merge(graphdef, state)(ids)                                        # [B, T, V]
    return nll_from_logits(logits, targets), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def make_window_fn(model: nnx.Module) -> WindowFn:
    """``(input_ids int32[B, T], targets int32[B, T]) -> (nll float[B, T], top1 int32[B, T])`` of an NNX
    module whose call is ``model(ids) -> logits [B, T, V]``: one jitted program per (graph, shapes), the
    weights traced arguments (models of one architecture share the compile)."""
    graphdef, state = nnx.split(model)

    def run(ids, targets):
        nll, top1 = _nll_and_top1(graphdef, state, jnp.asarray(ids), jnp.asarray(targets))
        return np.asarray(nll, np.float64), np.asarray(top1)

    return run


def score_sample(fn: WindowFn, sample: DomainSample, *, batch_size: int, desc: str | None = None) -> dict:
    """``{"nll": float[W] summed NLL per window, "tokens": int[W] scored tokens, "top1": int[W][T]}`` (lists,
    JSON-able); batches of exactly ``batch_size`` rows (the last filled with copies of row 0, dropped), so
    one compile per (batch_size, T)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    W = len(sample.inputs)
    nll = np.zeros(W, np.float64)
    top1 = np.zeros(sample.inputs.shape, np.int32)
    for i in tqdm(range(0, W, batch_size), desc=desc, leave=False, disable=desc is None, unit="batch"):
        ids, tg = sample.inputs[i:i + batch_size], sample.targets[i:i + batch_size]
        n = len(ids)
        if n < batch_size:
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - n, 0)])
            tg = np.concatenate([tg, np.repeat(tg[:1], batch_size - n, 0)])
        tok_nll, pred = fn(ids, tg)
        nll[i:i + n] = (tok_nll[:n] * sample.weights[i:i + n]).sum(axis=1)
        top1[i:i + n] = pred[:n]
    return {"nll": nll.tolist(), "tokens": sample.weights.sum(axis=1).astype(int).tolist(), "top1": top1.tolist()}


def _per_window(scores: dict) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(scores["tokens"], np.float64)
    return np.asarray(scores["nll"], np.float64) / np.maximum(tokens, 1), tokens


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def perplexity_ci(scores: dict, *, samples: int = 10000, seed: int = 0) -> dict:
    """``{"tokens", "windows", "nll", "ppl", "ppl_low", "ppl_high"}``: per-token NLL and perplexity with a
    95% bootstrap interval over windows."""
    nll, tokens = _per_window(scores)
    b = bootstrap_mean(nll, weights=tokens, samples=samples, seed=seed)
    return {"tokens": int(tokens.sum()), "windows": int(tokens.size), "nll": b["mean"], "ppl": _exp(b["mean"]),
            "ppl_low": _exp(b["ci_low"]), "ppl_high": _exp(b["ci_high"])}


def nll_difference(scores_a: dict, scores_b: dict, *, samples: int = 10000, seed: int = 0) -> dict:
    """Paired per-token NLL difference ``a - b`` on the same windows: ``{"diff", "ci_low", "ci_high",
    "p_value", "ratio", "ratio_low", "ratio_high"}`` (ratio = ppl_a / ppl_b = exp(diff), its CI exp of the
    diff's)."""
    a, tokens = _per_window(scores_a)
    b, tokens_b = _per_window(scores_b)
    if a.shape != b.shape or not np.array_equal(tokens, tokens_b):
        raise ValueError(f"paired NLL difference needs the same windows: {a.size} windows / {int(tokens.sum())} "
                         f"tokens vs {b.size} / {int(tokens_b.sum())}")
    d = paired_bootstrap(a, b, weights=tokens, samples=samples, seed=seed)
    return {**d, "ratio": _exp(d["diff"]), "ratio_low": _exp(d["ci_low"]), "ratio_high": _exp(d["ci_high"])}


def top1_agreement(scores: dict, reference: dict, weights: np.ndarray, *, samples: int = 10000,
                   seed: int = 0) -> dict:
    """Share of scored tokens (``weights`` float[W, T] > 0) where the two models' argmax agree, with a 95%
    bootstrap interval over windows: ``{"agreement", "ci_low", "ci_high", "tokens"}``."""
    a, r = np.asarray(scores["top1"]), np.asarray(reference["top1"])
    w = np.asarray(weights) > 0
    if a.shape != r.shape or a.shape != w.shape:
        raise ValueError(f"top-1 agreement needs the same windows: {a.shape} vs {r.shape} (weights {w.shape})")
    tokens = w.sum(axis=1)
    same = ((a == r) & w).sum(axis=1) / np.maximum(tokens, 1)
    b = bootstrap_mean(same, weights=tokens, samples=samples, seed=seed)
    return {"agreement": b["mean"], "ci_low": b["ci_low"], "ci_high": b["ci_high"], "tokens": int(tokens.sum())}
