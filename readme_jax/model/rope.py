"""Rotary position embeddings (rotate-half layout, as HF Llama), with theta and the linear, dynamic-NTK,
llama3 and YaRN scalings (each as transformers' ``modeling_rope_utils`` computes it)."""

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


def _yarn_inv_freq(inv_freq: np.ndarray, head_dim: int, theta: float, scaling: dict,
                   max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071): per-frequency blend of interpolated (inv / factor) and original frequencies,
    with a linear ramp between the dimensions that rotate ``beta_fast`` and ``beta_slow`` times over the
    original context; returns (inv_freq [hd/2], attention_factor that scales sin and cos)."""
    orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / orig
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all
                            else get_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001                                     # no zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp                              # 1: keep the original frequency, 0: interpolate
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)


def rope_sin_cos(positions: jnp.ndarray, cfg: LlamaConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rotation angles for ``positions`` <int32>[B, T] -> (sin, cos), each <float32>[B, T, hd/2]."""
    hd = cfg.head_dim
    scaling = cfg.rope_scaling_dict or {}
    rtype = scaling.get("rope_type", "default")
    pos = positions.astype(jnp.float32)
    scale = 1.0                                           # YaRN's attention factor on sin and cos
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
        elif rtype == "yarn":
            inv, scale = _yarn_inv_freq(inv, hd, cfg.rope_theta, scaling, cfg.max_position_embeddings)
        inv_freq = jnp.asarray(inv, jnp.float32)
    angles = pos[..., None] * inv_freq
    if scale != 1.0:
        return jnp.sin(angles) * scale, jnp.cos(angles) * scale
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [..., H, hd] by angles [..., hd/2] (leading dims e.g. [B, T] or a packed [N];
    rotate-half: pairs (i, i + hd/2))."""
    sin = jnp.concatenate([sin, sin], -1)[..., None, :].astype(x.dtype)
    cos = jnp.concatenate([cos, cos], -1)[..., None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin
