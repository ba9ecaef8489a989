"""Sampling: the one parameter validator and the token samplers (whole batch, or per row).

    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=1)   # validated here
    tok = sample_token(logits, key, temperature, top_p)                 # one setting for the batch
    tok = sample_rows(logits, seeds, positions, temperature, top_p)     # one setting per row (serving)

Every entry point (``generate``, its CLI, the server) validates through :class:`SamplingParams` /
:func:`validate_sampling`, so a bad value gets the same message everywhere, naming the field.
Greedy never pays for the vocabulary sort nucleus sampling needs (at V = 49,152 that sort costs more
than a SmolLM2 decode step on CPU): ``sample_token`` switches on the mode; ``sample_rows`` sorts only the
rows that ask for top-p, gathered into the smallest power-of-two bucket that holds them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from readme_jax.errors import SamplingError

MAX_SEED = 2**31 - 1


def validate_sampling(*, temperature=0.0, top_p=1.0, max_tokens=1, seed=None) -> None:
    """Raise :class:`SamplingError` (naming the field) unless temperature is finite and >= 0, top_p is in
    (0, 1], max_tokens is an integer >= 1 and seed is None or an integer in [0, 2**31 - 1]."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise SamplingError(name, f"expected a number, got {v!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SamplingError("temperature", f"expected a finite number >= 0, got {temperature!r}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise SamplingError("top_p", f"expected a number in (0, 1], got {top_p!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
        raise SamplingError("max_tokens", f"expected an integer >= 1, got {max_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed <= MAX_SEED):
        raise SamplingError("seed", f"expected an integer in [0, {MAX_SEED}] or null, got {seed!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. temperature 0 = greedy; top_p < 1 = nucleus; seed None = a seed
    drawn by the caller (the engine draws one per request, so the run is still reproducible from its log);
    stop: strings that end the output (not included); stop_token_ids: extra ids that end it (included in
    usage, not in the text); ignore_eos: keep going past EOS (benchmarks)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        validate_sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                          seed=self.seed)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", f"expected non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in self.stop_token_ids):
            raise SamplingError("stop_token_ids", f"expected non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _nucleus(scaled: jnp.ndarray, keys: jax.Array, top_p: jnp.ndarray) -> jnp.ndarray:
    """Nucleus sample of each row. scaled <f32>[R, V], keys [R], top_p [R] -> <int32>[R]."""
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p[:, None], sorted_logits, -jnp.inf)
    choice = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, sorted_logits)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample_token(logits: jnp.ndarray, rng: jax.Array, temperature: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """One setting for the whole batch. logits <f32>[B, V], rng a key, temperature / top_p scalars
    -> <int32>[B]. Each mode (greedy / categorical / nucleus) runs behind one ``lax.switch``."""
    def greedy(scaled):
        return jnp.argmax(scaled, axis=-1).astype(jnp.int32)

    def categorical(scaled):
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    def nucleus(scaled):
        keys = jax.random.split(rng, scaled.shape[0])
        return _nucleus(scaled, keys, jnp.full(scaled.shape[:1], top_p))

    scaled = logits / jnp.maximum(temperature, 1e-6)
    mode = jnp.where(temperature <= 0, 0, jnp.where(top_p < 1, 2, 1))
    return jax.lax.switch(mode, (greedy, categorical, nucleus), scaled)


def row_keys(seeds: jnp.ndarray, positions: jnp.ndarray) -> jax.Array:
    """One key per row that depends only on its request's seed and the token's position:
    ``fold_in(key(seed), position)``. seeds, positions <int32>[B] -> keys [B]."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def sample_rows(logits: jnp.ndarray, seeds: jnp.ndarray, positions: jnp.ndarray, temperature: jnp.ndarray,
                top_p: jnp.ndarray) -> jnp.ndarray:
    """One setting per row. logits <f32>[B, V]; seeds / positions <int32>[B] (position = index of the token
    being sampled in its sequence); temperature / top_p <f32>[B] -> <int32>[B].

    A row's token depends only on its logits, seed, position and settings, never on its neighbours. Greedy
    rows (temperature 0) take the argmax; the others sample (a batch of greedy rows only skips the draw);
    the rows asking for top_p < 1 are gathered into a bucket of 1, 2, 4, ... B rows (the smallest that
    holds them; none at all when no row asks) and only those are sorted."""
    B = logits.shape[0]
    keys = row_keys(seeds, positions)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(jnp.any(temperature > 0),       # an all-greedy batch draws nothing
                           lambda: jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, scaled).astype(jnp.int32),
                           lambda: greedy)
    wants_nucleus = (temperature > 0) & (top_p < 1)
    order = jnp.argsort(~wants_nucleus, stable=True).astype(jnp.int32)     # nucleus rows first
    count = jnp.sum(wants_nucleus, dtype=jnp.int32)
    sizes = [0] + [1 << i for i in range(max(1, B).bit_length()) if (1 << i) < B] + [B]

    def bucket(size):
        def run(out):
            if size == 0:
                return out
            rows = order[:size]
            picked = _nucleus(scaled[rows], keys[rows], top_p[rows])
            return out.at[rows].set(jnp.where(wants_nucleus[rows], picked, out[rows]))
        return run

    which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count, side="left")
    out = jnp.where(temperature > 0, sampled, greedy)
    return jax.lax.switch(which, [bucket(s) for s in sizes], out)
