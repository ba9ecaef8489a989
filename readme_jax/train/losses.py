"""Losses and routing metrics of the alternating tuning (method step 5).

Letters: B batch, T time, V vocab, L layers, F ffn channels, E experts.

* :func:`lm_loss` - next-token cross-entropy, mean over ``loss_mask``.
* :func:`router_targets` - the routing-distillation targets ``dist [L, B, T, E]`` of the paper's routing-
  distillation loss in the authors' code form (docs/architecture.md), computed *inside* the dense forward
  by an ``ffn_fn`` whose aux is the per-layer ``dist``: the [B, T, F] down_proj inputs are reduced to
  [B, T, E] in the layer that makes them, so they never stack across layers.
* :func:`distill_loss` - 0.75 x CE(hard target, label smoothing 0.5) + 0.25 x soft CE (T = 1), summed over
  layers against the one router output, masked mean over tokens.
* :func:`router_accuracy` - reported next to perplexity (routing locality: readme_jax/eval/routing.py).

Per layer l (N = N_l = size of one expert-specific mask at layer l; every expert's has the same size):
    feat      = the dense model's down_proj input at layer l              [B, T, F]  (signed, as the code)
    feat_th   = sum_{r in {N-1, 4N/5, 3N/5, 2N/5, N/5}} 1[feat > r-th largest of feat along F] / (3N)
    dist      = feat_th @ specific_maskᵀ                                   [B, T, E]
    dist      = (dist - mean_E(dist)) * 10
The fractions are floored (``4N // 5``), and an r below 1 is taken as 1 (only when N < 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model.decoder import dense_ffn_with_aux, positions_from_mask, run_layers
from readme_jax.model.router import top1_expert

HARD_WEIGHT = 0.75
SOFT_WEIGHT = 0.25
LABEL_SMOOTHING = 0.5
TEMPERATURE = 1.0
TARGET_SCALE = 10.0


# ---------------------------------------------------------------------------------------- LM loss
def lm_loss(nll: jnp.ndarray, loss_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Masked next-token cross-entropy from per-token NLL (``model.token_nll``).

    nll <float32>[B, T], loss_mask <float32>[B, T].
    Returns (mean NLL over masked tokens <float32>[], number of masked tokens <float32>[]).
    """
    w = loss_mask.astype(jnp.float32)
    count = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(count, 1.0), count


# ------------------------------------------------------------------------------------- targets
def graded_topn(feat: jnp.ndarray, n: jnp.ndarray, max_n: int | None = None) -> jnp.ndarray:
    """The graded top-N indicator of ``feat`` along its last axis, divided by 3N.

    feat <float>[..., F]; n <int>[] (may be traced). Returns <float32>[..., F] with values in
    {0, 1/(3N), ..., 5/(3N)}: a channel scores one 1/(3N) per threshold r in {N-1, 4N/5, 3N/5, 2N/5, N/5}
    it strictly exceeds (r-th largest of ``feat``). ``max_n`` (static, >= n) bounds the ranks needed.
    """
    feat = feat.astype(jnp.float32)
    n = jnp.asarray(n, jnp.int32)
    k = feat.shape[-1] if max_n is None else max(1, min(int(max_n), feat.shape[-1]))
    ranks = jnp.clip(jnp.stack([n - 1, (4 * n) // 5, (3 * n) // 5, (2 * n) // 5, n // 5]), 1, k)
    thr = rank_values(feat, ranks, k)                        # [..., 5]
    total = sum((feat > thr[..., i:i + 1]).astype(jnp.float32) for i in range(5))
    return total / (3.0 * jnp.maximum(n, 1).astype(jnp.float32))


def rank_values(feat: jnp.ndarray, ranks: jnp.ndarray, max_rank: int) -> jnp.ndarray:
    """The ranks[i]-th largest value of ``feat`` along its last axis: feat [..., F], ranks <int32>[R]
    (1-based, <= the static ``max_rank``) -> [..., R].

    GPU/TPU: read off ``lax.top_k(feat, max_rank)``. CPU: XLA lowers a top_k of ~500 of 1536 to a full
    key-value sort (343 ms per SmolLM2 layer at 2048 tokens, 70% of the targets pass), while NumPy's
    vectorised ``np.partition`` takes ~45 ms, so there the values come from the host (``pure_callback``;
    on CPU the arrays are already in host memory)."""
    if jax.default_backend() != "cpu":
        desc = jax.lax.top_k(feat, max_rank)[0]
        return jnp.take(desc, ranks - 1, axis=-1)
    out = jax.ShapeDtypeStruct(feat.shape[:-1] + ranks.shape, feat.dtype)
    return jax.pure_callback(_host_rank_values, out, feat, ranks, vmap_method="sequential")


def _host_rank_values(feat: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    f = feat.shape[-1]
    kth = f - np.asarray(ranks, np.int64)                 # the r-th largest sits at ascending index F - r
    return np.take(np.partition(np.asarray(feat), np.unique(kth), axis=-1), kth, axis=-1)


def layer_targets(feat: jnp.ndarray, specific: jnp.ndarray, use_abs: bool = False,
                  max_n: int | None = None) -> jnp.ndarray:
    """One layer's ``dist``: feat <float>[B, T, F], specific <bool|float>[E, F] -> <float32>[B, T, E].

    ``max_n``: static bound on the expert-specific mask size (see ``graded_topn``)."""
    specific = specific.astype(jnp.float32)
    if use_abs:
        feat = jnp.abs(feat)
    n = jnp.sum(specific[0]).astype(jnp.int32)             # N_l: every expert-specific mask has this size
    th = graded_topn(feat, n, max_n)
    dist = jnp.einsum("btf,ef->bte", th, specific)
    return (dist - jnp.mean(dist, axis=-1, keepdims=True)) * TARGET_SCALE


def router_targets(dense_model, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None,
                   specific_masks: jnp.ndarray, *, use_abs: bool = False) -> jnp.ndarray:
    """Routing-distillation targets from the frozen dense parent.

    dense_model: a :class:`readme_jax.model.llama.Llama`; input_ids <int32>[B, T];
    attention_mask <bool>[B, T] or None; specific_masks <bool>[E, L, F] (``ExpertMasks.specific``).
    Returns dist <float32>[L, B, T, E] (no gradient flows into it).
    """
    cfg = dense_model.config
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    attention_mask = attention_mask.astype(bool)
    E, L, F = specific_masks.shape
    if L != cfg.num_layers or F != cfg.intermediate_size:
        raise ValueError(f"router_targets: specific_masks are [E, L={L}, F={F}], the dense model has "
                         f"L={cfg.num_layers}, F={cfg.intermediate_size}")
    try:   # the largest N_l over layers, when the masks are concrete (they are closed over in the pipeline)
        max_n = int(np.max(np.sum(np.asarray(specific_masks[0]), axis=-1)))
    except jax.errors.TracerArrayConversionError:
        max_n = None
    layers = dict(dense_model.layer_arrays())
    layers["specific"] = jnp.swapaxes(jnp.asarray(specific_masks, jnp.float32), 0, 1)   # [L, E, F]

    ffn = dense_ffn_with_aux(lambda p, act: layer_targets(act, p["specific"], use_abs, max_n))
    x = dense_model.tok.encode(input_ids)
    _, _, dist = run_layers(layers, x, positions=positions_from_mask(attention_mask),
                            attention_mask_=attention_mask, cfg=cfg, ffn_fn=ffn)
    return jax.lax.stop_gradient(dist)


# --------------------------------------------------------------------------------- distillation
def distill_loss(router_logits: jnp.ndarray, dist: jnp.ndarray, token_mask: jnp.ndarray) -> jnp.ndarray:
    """Routing-distillation loss (the authors' code form, docs/architecture.md), summed over layers, masked mean over tokens.

    router_logits <float>[B, T, E]; dist <float32>[L, B, T, E]; token_mask <float|bool>[B, T].
    Returns <float32>[].
    """
    E = router_logits.shape[-1]
    logp = jax.nn.log_softmax(router_logits.astype(jnp.float32), axis=-1)[None]       # [1, B, T, E]
    hard = jax.nn.one_hot(top1_expert(dist), E, dtype=jnp.float32)
    smoothed = (1.0 - LABEL_SMOOTHING) * hard + LABEL_SMOOTHING / E
    ce_hard = -jnp.sum(smoothed * logp, axis=-1)                                       # [L, B, T]
    t = TEMPERATURE
    soft = jax.nn.softmax(dist / t, axis=-1)
    logp_t = jax.nn.log_softmax(router_logits.astype(jnp.float32) / t, axis=-1)[None]
    ce_soft = -jnp.sum(soft * logp_t, axis=-1) * t * t
    per_token = jnp.sum(HARD_WEIGHT * ce_hard + SOFT_WEIGHT * ce_soft, axis=0)        # [B, T]
    w = token_mask.astype(jnp.float32)
    return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), 1.0)


# -------------------------------------------------------------------------------------- metrics
def router_accuracy(router_logits: jnp.ndarray, dist: jnp.ndarray, token_mask: jnp.ndarray) -> jnp.ndarray:
    """Share of tokens where argmax(router) == argmax(sum over layers of dist). <float32>[]."""
    hit = top1_expert(router_logits) == top1_expert(jnp.sum(dist, axis=0))
    w = token_mask.astype(jnp.float32)
    return jnp.sum(hit * w) / jnp.maximum(jnp.sum(w), 1.0)
