"""Batched generation with the KV cache: greedy, temperature and top-p sampling, stop on EOS.

Works for every model kind that has ``init_cache(batch, max_len)``, ``layer_arrays()`` and a call
``model(ids, attention_mask=..., cache=cache, layers=...) -> (logits, cache)`` (the dense Llama and the Read-ME MoE,
whose cache also carries its router's cache). Prompts are left-padded into one batch; prefill is one call,
then the whole decode loop runs inside one ``jax.jit`` as a ``lax.while_loop`` that stops when every row
has produced EOS or ``max_new_tokens``. ``prefill`` and ``decode`` are the two jitted halves (benchmarks
time them separately). Tokens are picked by :func:`readme_jax.sampling.sample_token` and the settings are
checked by :func:`readme_jax.sampling.validate_sampling`, the validator every entry point shares.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.sampling import sample_token, validate_sampling

PROMPT_BUCKET = 32  # prompts are padded to a multiple of this, so nearby lengths share one compile


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def prefill(graphdef, state, ids, mask, *, max_len: int):
    """Run left-padded prompts ``ids``/``mask`` [B, P] into a fresh cache of ``max_len`` slots.

    Returns (logits of each row's last position <f32>[B, V], cache)."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(ids.shape[0], max_len)
    logits, cache = model(ids, attention_mask=mask, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"), donate_argnames=("cache",))
def decode(graphdef, state, cache, last_logits, rng, temperature, top_p, eos_id, pad_id, *, max_new_tokens: int):
    """Sample up to ``max_new_tokens`` tokens per row, one ``lax.while_loop`` step per token.

    The loop stops early once every row has produced ``eos_id`` (pass -1 to never stop). The layer weights
    are split per layer (and per expert) once, before the loop (``model.decode_layers(B)``), so no step
    re-slices the stacked weights.
    Returns (tokens <int32>[B, max_new_tokens] (``pad_id`` after a row's EOS and past the last step),
    number of steps run, cache)."""
    model = nnx.merge(graphdef, state)
    B = last_logits.shape[0]
    layers = model.decode_layers(B)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, last, rng, out, done = carry
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad_id, sample_token(last, key, temperature, top_p))
        out = out.at[:, i].set(tok)
        done = done | (tok == eos_id)
        logits, cache = model(tok[:, None], cache=cache, layers=layers)
        return i + 1, cache, logits[:, -1], rng, out, done

    carry = (jnp.zeros((), jnp.int32), cache, last_logits, rng, out, jnp.zeros((B,), bool))
    n, cache, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    return out, n, cache


def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt (a list of token ids). Returns the new ids per prompt, cut after EOS (kept).

    Raises :class:`readme_jax.errors.SamplingError` naming the field for a bad temperature, top_p,
    max_new_tokens (``max_tokens``) or seed."""
    validate_sampling(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        getattr(model.config, "base", None), "max_position_embeddings", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {limit} tokens")
    P = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for row, p in enumerate(prompts):
        ids[row, P - len(p):] = p
        mask[row, P - len(p):] = True
    graphdef, state = nnx.split(model)
    eos = -1 if eos_id is None else eos_id
    last, cache = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), max_len=P + max_new_tokens)
    out, n, _ = decode(graphdef, state, cache, last, jax.random.key(seed), jnp.float32(temperature),
                       jnp.float32(top_p), jnp.int32(eos), jnp.int32(pad_id), max_new_tokens=max_new_tokens)
    out = np.asarray(out)[:, : int(n)]
    results = []
    for row in out:
        row = row.tolist()
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        results.append(row)
    return results


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_on_eos: bool = True,
             chat: bool = False) -> str | list[str]:
    """Generate text continuations. A single prompt string returns a string; a list returns a list.

    ``chat=True`` wraps each prompt as a user message with the tokenizer's chat template.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
                 for t in texts]
    add_bos = not chat and tokenizer.bos_id is not None and getattr(tokenizer, "add_bos_default", False)
    ids = tokenizer.encode_batch(texts, bos=add_bos)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    new = generate_ids(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       eos_id=tokenizer.eos_id if stop_on_eos else None, pad_id=pad)
    if stop_on_eos and tokenizer.eos_id is not None:
        new = [row[:-1] if row and row[-1] == tokenizer.eos_id else row for row in new]
    outs = [tokenizer.decode(row) for row in new]
    return outs[0] if single else outs
