"""The sampling side of the packed step (``serve/paged_runner.py``): per-row logit processors with their state on
the device, and the log-probabilities a step returns.

    state = init_row_state(rows=M, vocab_size=V)                 # on device, donated through every step
    state = reset_row(state, row, bias_ids, bias_values)         # a request takes device row `row`
    proc = host_processors(batch, n, s, N, S, M)                 # the step's per-row / per-token arrays
    state = count_tokens(state, tokens, proc)                    # in the step: every input token counted
    logits = apply_row_processors(logits, state, proc)           # penalties + logit_bias of each sampling row

Per-row state (vLLM's definitions, on prompt + output tokens): ``seen`` <bool>[M, V] (the token occurred in the
sequence), ``counts`` <int32>[M, V] (occurrences among the generated tokens), ``bias`` <f32>[M, V] (logit_bias).
A request that uses a penalty or logit_bias owns one device row while it holds a slot (the engine's slot id);
``reset_row`` clears it when the request takes the slot (again after a preemption), and each step adds its input
tokens (those at positions >= the prompt length are output tokens). Every token of the sequence is an input token
once, because such a request never reads the prefix cache (``kv_pages``: its prefill runs every token), so the
counts are never rebuilt on the host. The sampled token is counted when it is fed back as the next input.

A step where no row uses a processor skips the work behind one ``lax.cond`` (its only cost: scattering nothing);
top-k and top-p sort only their rows (``sampling.on_rows``).

Dimension names: n / N tokens (bucket), s / S sequences (bucket), M device rows (max_num_seqs), V vocab, K =
MAX_LOGPROBS alternatives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.sampling import MAX_LOGPROBS, apply_logit_bias, on_rows, token_logprobs

PROC_ROW_FIELDS = ("top_k", "min_p", "presence", "frequency", "repetition")


def init_row_state(rows: int, vocab_size: int) -> dict:
    """Zeroed per-row processor state (see the module docstring)."""
    return {"seen": jnp.zeros((rows, vocab_size), bool), "counts": jnp.zeros((rows, vocab_size), jnp.int32),
            "bias": jnp.zeros((rows, vocab_size), jnp.float32)}


BIAS_CHUNK = 64     # logit_bias entries per reset_row call (one compiled shape)


@functools.partial(jax.jit, donate_argnames=("state",))
def _set_row(state: dict, row, bias_ids, bias_values, clear) -> dict:
    bias = apply_logit_bias(jnp.zeros((1, state["bias"].shape[1]), jnp.float32), bias_ids[None], bias_values[None])
    keep = jnp.logical_not(clear)
    return {"seen": state["seen"].at[row].set(state["seen"][row] & keep),
            "counts": state["counts"].at[row].set(state["counts"][row] * keep),
            "bias": state["bias"].at[row].set(state["bias"][row] * keep + bias[0])}


def reset_row(state: dict, row: int, bias_ids=(), bias_values=()) -> dict:
    """Row ``row`` cleared and given its logit_bias (distinct token ids, values), BIAS_CHUNK entries a call."""
    for start in range(0, max(1, len(bias_ids)), BIAS_CHUNK):
        ids, vals = np.full(BIAS_CHUNK, -1, np.int32), np.zeros(BIAS_CHUNK, np.float32)
        part = slice(start, start + BIAS_CHUNK)
        k = len(bias_ids[part])
        ids[:k], vals[:k] = bias_ids[part], bias_values[part]
        state = _set_row(state, np.int32(row), ids, vals, np.bool_(start == 0))
    return state


def count_tokens(state: dict, tokens: jnp.ndarray, proc: dict) -> dict:
    """Add the step's input tokens to their rows: proc["token_row"] <int32>[N] (M: not counted, dropped),
    proc["token_out"] <bool>[N] (a generated token: counted in ``counts`` too)."""
    row = proc["token_row"]
    return {"seen": state["seen"].at[row, tokens].set(True, mode="drop"),
            "counts": state["counts"].at[row, tokens].add(proc["token_out"].astype(jnp.int32), mode="drop"),
            "bias": state["bias"]}


def apply_row_processors(logits: jnp.ndarray, state: dict, proc: dict) -> jnp.ndarray:
    """vLLM's penalties and logit_bias of each sampling row (``sampling.apply_penalties``'s definitions, read from
    the device rows proc["row"] <int32>[S]; M: none). logits <f32>[S, V] -> <f32>[S, V]; skipped (one
    ``lax.cond``) when proc["on"] is False."""
    def run(logits):
        take = functools.partial(jnp.take, indices=proc["row"], axis=0, mode="fill")
        seen, counts, bias = take(state["seen"], fill_value=False), take(state["counts"], fill_value=0), \
            take(state["bias"], fill_value=0.0)
        rep = proc["repetition"][:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - proc["frequency"][:, None] * counts.astype(logits.dtype)
        return logits - proc["presence"][:, None] * (counts > 0).astype(logits.dtype) + bias
    return jax.lax.cond(proc["on"], run, lambda x: x, logits)


def _no_logprobs(n: int) -> tuple:
    """``token_logprobs``'s outputs for ``n`` rows that did not ask: zeros, rank 0, -inf alternatives."""
    K = MAX_LOGPROBS
    return (jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32), jnp.zeros((n, K), jnp.int32),
            jnp.full((n, K), -jnp.inf, jnp.float32))


def row_logprobs(logits: jnp.ndarray, tok: jnp.ndarray, want: jnp.ndarray):
    """``token_logprobs`` of the rows in ``want`` only (``on_rows``: a step with one such row pays for one row's
    top-k). logits <f32>[S, V] (raw), tok <int32>[S], want <bool>[S] -> (logprob <f32>[S], rank <int32>[S],
    top ids <int32>[S, K], top logprobs <f32>[S, K]); zeros / -inf on the other rows."""
    return on_rows(want, lambda rows: token_logprobs(logits[rows], tok[rows], MAX_LOGPROBS),
                   _no_logprobs(logits.shape[0]))


def prompt_logprobs(head, x: jnp.ndarray, next_tokens: jnp.ndarray, on: jnp.ndarray):
    """Each packed token's log-probability and rank of the token after it (the prompt logprobs of an echo or
    ``prompt_logprobs`` request), from the LM head over every token: x [N, D] hidden states, ``head(x) -> logits
    [N, V]``, next_tokens <int32>[N] -> (<f32>[N], <int32>[N], <int32>[N, K], <f32>[N, K]); only when ``on`` (else
    zeros / -inf, the head not run)."""
    return jax.lax.cond(on, lambda: token_logprobs(head(x), next_tokens, MAX_LOGPROBS),
                        lambda: _no_logprobs(x.shape[0]))


# --- host side ------------------------------------------------------------------------------------------------

def host_processors(batch, n: int, s: int, N: int, S: int, M: int) -> dict:
    """The step's processor arrays (host NumPy, padded to the buckets) from a StepBatch's optional fields."""
    def rows(values, fill, dtype):
        out = np.full(S, fill, dtype)
        if values is not None:
            out[:s] = values
        return out
    row = rows(None if batch.proc_rows is None else np.where(np.asarray(batch.proc_rows) < 0, M, batch.proc_rows),
               M, np.int32)
    proc = {"top_k": rows(batch.top_ks, 0, np.int32), "min_p": rows(batch.min_ps, 0.0, np.float32),
            "presence": rows(batch.presence, 0.0, np.float32), "frequency": rows(batch.frequency, 0.0, np.float32),
            "repetition": rows(batch.repetition, 1.0, np.float32), "row": row}
    token_row, token_out = np.full(N, M, np.int32), np.zeros(N, bool)
    if batch.proc_rows is not None:
        q = np.asarray(batch.q_lens)
        token_row[:n] = np.repeat(row[:s], q)
        if batch.prompt_lens is not None:
            token_out[:n] = np.asarray(batch.positions) >= np.repeat(np.asarray(batch.prompt_lens), q)
    on = bool((row < M).any())
    proc.update(token_row=token_row, token_out=token_out, on=np.bool_(on))
    return proc

