"""Rotary position embeddings (rotate-half layout, as HF Llama), with theta and the linear, dynamic-NTK and
llama3 scalings."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from readme_jax.model.config import LlamaConfig


def base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """<float32>[hd/2]: theta ** (-2i / hd)."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def rope_sin_cos(positions: jnp.ndarray, cfg: LlamaConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rotation angles for ``positions`` <int32>[B, T] -> (sin, cos), each <float32>[B, T, hd/2]."""
    hd = cfg.head_dim
    scaling = cfg.rope_scaling_dict or {}
    rtype = scaling.get("rope_type", "default")
    pos = positions.astype(jnp.float32)
    if rtype == "dynamic":
        # NTK-aware: the base grows with the longest position seen in this call (as HF's dynamic update).
        factor = scaling["factor"]
        orig = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        seq_len = jnp.maximum(jnp.max(positions) + 1, orig).astype(jnp.float32)
        base = cfg.rope_theta * ((factor * seq_len / orig) - (factor - 1)) ** (hd / (hd - 2))
        inv_freq = 1.0 / (base ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    else:
        inv = base_inv_freq(hd, cfg.rope_theta)
        if rtype == "linear":
            inv = inv / scaling["factor"]
        elif rtype == "llama3":
            inv = _llama3_inv_freq(inv, scaling)
        inv_freq = jnp.asarray(inv, jnp.float32)
    angles = pos[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [..., H, hd] by angles [..., hd/2] (leading dims e.g. [B, T] or a packed [N];
    rotate-half: pairs (i, i + hd/2))."""
    sin = jnp.concatenate([sin, sin], -1)[..., None, :].astype(x.dtype)
    cos = jnp.concatenate([cos, cos], -1)[..., None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin
