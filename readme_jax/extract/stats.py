"""Calibration statistics (method step 2): per layer and FFN channel, the mean |down_proj input| over real
tokens, streamed through the dense model in one jitted step per batch shape.

    scores = channel_scores(model, batches)                      # <float32>[L, F]
    domains, scores = domain_scores(model, {"arxiv": it, ...})   # <float32>[E, L, F]

A batch is a dict with ``input_ids`` <int32>[B, T] and a mask of real tokens: ``attention_mask`` (also used
as the attention's padding mask) or, from the packed grain pipeline, ``loss_mask`` (counted tokens only;
packed rows attend to everything before them). A ``(input_ids, mask)`` tuple or a bare id array (all
tokens real) is accepted too. Sums and counts accumulate in float32 on the device.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.model.decoder import dense_ffn_with_aux


def _unpack(batch: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """batch -> (input_ids [B, T], attention mask [B, T] or None, counted-token mask [B, T])."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise KeyError(f"statistics batch: no 'input_ids' (keys: {sorted(batch)})")
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        count = attn if attn is not None else batch.get("loss_mask")
    elif isinstance(batch, (tuple, list)):
        ids, attn = batch
        count = attn
    else:
        ids, attn, count = batch, None, None
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"statistics batch: input_ids must be [B, T], got shape {ids.shape}")
    count = np.ones(ids.shape, bool) if count is None else np.asarray(count) != 0
    attn = None if attn is None else np.asarray(attn) != 0
    if count.shape != ids.shape or (attn is not None and attn.shape != ids.shape):
        raise ValueError(f"statistics batch: mask shape {count.shape} != input_ids shape {ids.shape}")
    return ids, attn, count


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3, 4))
def _accumulate(graphdef, state, sums, count, grams, input_ids, attention_mask, count_mask):
    """One batch: sums [L, F] += sum over counted tokens of |SiLU(h W_gate) * (h W_up)|; count += tokens;
    grams [L, F, F] (when not None) += actᵀ act over counted tokens (the refit's normal equations)."""
    model = nnx.merge(graphdef, state)
    weight = count_mask.astype(jnp.float32)                                           # [B, T]

    def aux(p, act):
        a = act.astype(jnp.float32)
        s = jnp.einsum("btf,bt->f", jnp.abs(a), weight)
        return s if grams is None else (s, jnp.einsum("btf,btg->fg", a * weight[..., None], a))

    _, _, stats = model.hidden_states(input_ids, attention_mask=attention_mask, ffn_fn=dense_ffn_with_aux(aux))
    if grams is None:
        return sums + stats, count + jnp.sum(weight), None
    return sums + stats[0], count + jnp.sum(weight), grams + stats[1]


def channel_sums(model, batches: Iterable, *, desc: str = "statistics", progress: bool = True,
                 gram: bool = False) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(sum of |down_proj input| <float32>[L, F], number of counted tokens, and with ``gram`` the sum of
    actᵀ act <float32>[L, F, F] over counted tokens, else None) over ``batches``."""
    graphdef, state = nnx.split(model)
    cfg = model.config
    L, F = cfg.num_layers, cfg.intermediate_size
    sums = jnp.zeros((L, F), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    grams = jnp.zeros((L, F, F), jnp.float32) if gram else None
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids, attn, counted = _unpack(batch)
        if attn is None:
            attn = np.ones(ids.shape, bool)
        sums, count, grams = _accumulate(graphdef, state, sums, count, grams, ids, attn, counted)
    return np.asarray(sums, np.float32), float(count), None if grams is None else np.asarray(grams, np.float32)


def channel_scores(model, batches: Iterable, *, desc: str = "statistics", progress: bool = True) -> np.ndarray:
    """Mean |SiLU(x W_gate) * (x W_up)| per layer and channel over the real tokens of ``batches``:
    <float32>[L, F]. ``model`` is a dense Llama (anything with ``config`` and ``hidden_states(ffn_fn=)``)."""
    return _means(desc, *channel_sums(model, batches, desc=desc, progress=progress))[0]


def _means(desc, sums, count, grams):
    if count == 0:
        raise ValueError(f"channel_scores ({desc}): the batches held no counted token")
    return sums / np.float32(count), None if grams is None else grams / np.float32(count)


def domain_scores(model, batches_by_domain: Mapping[str, Iterable], *,
                  progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(domain names in the mapping's order, <float32>[E, L, F]) — ``channel_scores`` per domain."""
    domains, scores, _ = domain_statistics(model, batches_by_domain, progress=progress)
    return domains, scores


def domain_statistics(model, batches_by_domain: Mapping[str, Iterable], *, progress: bool = True,
                      gram: bool = False) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(domain names, scores <float32>[E, L, F], and with ``gram`` each domain's mean actᵀ act <float32>[E, L,
    F, F] over its counted tokens, else None), one pass per domain."""
    if not batches_by_domain:
        raise ValueError("domain_scores: no domains given")
    domains = list(batches_by_domain)
    out = [_means(f"statistics[{d}]", *channel_sums(model, batches_by_domain[d], desc=f"statistics[{d}]",
                                                     progress=progress, gram=gram)) for d in domains]
    scores = np.stack([o[0] for o in out])
    return domains, scores, (np.stack([o[1] for o in out]) if gram else None)
