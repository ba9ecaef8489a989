"""The model side of the engine: jitted steps over a fixed set of cache slots, compiled once per bucket.

    runner = ModelRunner(model, num_slots=8, max_len=2048, prefill_buckets=(16, 32, 64, 128, 256),
                         mesh=None)                         # or make_mesh({"data": 2, "fsdp": 4}): see below
    experts = runner.route_prompt(prompt_ids)              # the router's expert of every prompt token (lookahead)
    tok, nxt = runner.prefill(slot, chunk_ids, chunk_experts, is_last, sampling row)    # one chunk, one slot
    toks, nxts = runner.decode(slots, tokens, experts, sampling rows)                   # one token per picked slot
    runner.free(slot)

State: one backbone ``KVCache`` [L, B, S, K, hd] with a write index per slot (``model/decoder.py``), and for
Read-ME the router's own per-slot cache. The padding entries of a decode bucket point one past the last row
(``scratch`` = B): the gather clamps them (they read row B - 1) and the scatter back drops them, so padding
never overwrites a real slot. The router is always one token ahead of the backbone: a step runs the backbone
on each picked slot's pending token (whose expert is known), samples the next token, routes it with one
incremental router step, and returns both to the host in two small arrays, so before every step the
scheduler knows the expert of every waiting token. The backbone never routes.

Buckets: a prefill chunk of n tokens is right-padded to the smallest prefill bucket >= n (padding tokens get
expert -1 and no cache entry); a decode step over m picked slots gathers their cache rows into the smallest
power-of-two bucket >= m, or, when m is more than half the slots, runs every row in place (unpicked rows
masked), which saves the gather and scatter of whole cache rows.
After ``warmup()`` no request triggers a compile. Decode splits the stacked layer weights per layer once
(``decoder.unstack_layers``): a scan over stacked weights copies every layer's weights at every step on CPU.

Under a mesh (``parallel/mesh.make_mesh``): the params are placed by the training rule table
(``parallel/sharding.param_shardings``: D over "fsdp", the experts' E over "expert" where it divides, else
their F), and every cache array is split on its row dimension B over the mesh's batch axes where B divides
(``spec_for`` with the ACTIVATION_AXES letters: k/v "kv_cache", key_mask "cache_rows", index/next_pos its
"B"), so each device holds only its slots' keys and values, the cache's bulk. Each step constrains the caches
it returns to that layout (static ``layout``), so they stay split (and donated in place) across steps; XLA
inserts the weights' all-gathers. The resident expert pool is one device's memory: a mesh refuses it.
Why padding points past the rows rather than at a scratch row: B + 1 rows would not split over a mesh whose
batch ways divide the slot count; rounding the rows up to a multiple would cost up to a mesh's worth of
unused rows, and splitting the kv heads K instead fails for K = 1 and splits attention apart from the rows.

Dimension names: B slots, S cache slots per row (max_len), T chunk bucket, M decode bucket, V vocab, E experts.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from readme_jax.model import dispatch, moe
from readme_jax.model.decoder import KVCache, unstack_layers
from readme_jax.model.protocol import is_routed
from readme_jax.parallel import sharding
from readme_jax.sampling import sample_rows
from readme_jax.serve.resident import ResidentPool


@flax.struct.dataclass
class SlotCaches:
    """backbone: KVCache [L, B, S, K, hd]; router: the router's KVCache [Lr, B, S, H, hd] or None."""

    backbone: KVCache
    router: KVCache | None


def _rows(cache: KVCache | None, slots: jnp.ndarray) -> KVCache | None:
    """The cache rows of ``slots`` <int32>[M] as an M-row KVCache (an id >= B reads row B - 1)."""
    if cache is None:
        return None
    def take(a, axis):
        return jnp.take(a, slots, axis=axis, mode="clip")
    return KVCache(k=take(cache.k, 1), v=take(cache.v, 1), key_mask=take(cache.key_mask, 0),
                   index=take(cache.index, 0), next_pos=take(cache.next_pos, 0))


def _put_rows(cache: KVCache | None, slots: jnp.ndarray, rows: KVCache | None) -> KVCache | None:
    """``cache`` with rows ``slots`` <int32>[M] set to ``rows``; the rows of ids >= B are dropped."""
    if cache is None:
        return None
    return KVCache(k=cache.k.at[:, slots].set(rows.k, mode="drop"), v=cache.v.at[:, slots].set(rows.v, mode="drop"),
                   key_mask=cache.key_mask.at[slots].set(rows.key_mask, mode="drop"),
                   index=cache.index.at[slots].set(rows.index, mode="drop"),
                   next_pos=cache.next_pos.at[slots].set(rows.next_pos, mode="drop"))


def _constrain(caches: SlotCaches, layout: SlotCaches | None) -> SlotCaches:
    """``caches`` kept in ``layout`` (their NamedShardings under a mesh; None: as XLA places them)."""
    return caches if layout is None else jax.lax.with_sharding_constraint(caches, layout)


def cache_layout(caches: SlotCaches, mesh: jax.sharding.Mesh) -> SlotCaches:
    """The NamedShardings of ``caches`` (arrays or ShapeDtypeStructs) on ``mesh``: B split over the batch axes
    where it divides (``sharding.spec_for``), every other dimension replicated."""
    kv, rows = sharding.ACTIVATION_AXES["kv_cache"], sharding.ACTIVATION_AXES["cache_rows"]

    def named(letters, a):
        return NamedSharding(mesh, sharding.spec_for(letters, tuple(a.shape), mesh))

    def one(c):
        if c is None:
            return None
        return KVCache(k=named(kv, c.k), v=named(kv, c.v), key_mask=named(rows, c.key_mask),
                       index=named(rows[0], c.index), next_pos=named(rows[0], c.next_pos))
    return SlotCaches(backbone=one(caches.backbone), router=one(caches.router))


def _backbone(model, ids, mask, experts, cache, layers, dispatcher, num_experts=None):
    """Backbone only (never routes): ids/mask/experts [M, T] -> (x [M, T, D], cache). ``num_experts``: plan
    over that many experts (the resident pool's k slots, ``experts`` then being slot ids)."""
    if is_routed(model):
        if num_experts is not None:
            plan = moe.plan_dispatch(experts, num_experts, dispatcher=dispatcher)
            x, cache, _ = model.backbone(ids, plan=plan, attention_mask=mask, cache=cache, layers=layers)
        else:
            x, cache, _ = model.backbone(ids, expert_ids=experts, attention_mask=mask, cache=cache, layers=layers,
                                         dispatcher=dispatcher)
    else:
        x, cache, _ = model.hidden_states(ids, attention_mask=mask, cache=cache, layers=layers)
    return x, cache


def _sample_and_route(model, x_last, rcache, valid, seeds, positions, temps, top_ps):
    """Head on the last real position, per-row sampling, one router step on the sampled token.
    x_last [M, D] -> (tokens <int32>[M], their experts <int32>[M] (-1: dense or invalid), router cache)."""
    logits = model.tok.decode(x_last[:, None])[:, 0]
    tokens = sample_rows(logits, seeds, positions, temps, top_ps)
    if rcache is None:
        return tokens, jnp.full_like(tokens, -1), None
    nxt, rcache = model.route(tokens[:, None], attention_mask=valid[:, None], router_cache=rcache)
    return tokens, jnp.where(valid, nxt[:, 0], -1), rcache


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"), donate_argnames=("caches",))
def _prefill_step(graphdef, params, caches: SlotCaches, slot, ids, n_real, experts, is_last, seed, temp, top_p,
                  layout=None):
    """One right-padded chunk ids <int32>[1, T] (n_real real tokens, their experts [1, T]) into ``slot``.
    Reads every expert's weights from the model (the resident pool serves decode steps only). ``layout``: the
    caches' shardings to keep (``cache_layout``; None without a mesh)."""
    model = nnx.merge(graphdef, params)
    slots = slot[None]
    mask = jnp.arange(ids.shape[1])[None, :] < n_real
    backbone = _rows(caches.backbone, slots)
    x, backbone = _backbone(model, ids, mask, jnp.where(mask, experts, -1), backbone, None, None)
    rcache = _rows(caches.router, slots)
    if rcache is not None:                                   # the router cache follows the prompt chunk
        _, rcache = model.route(ids, attention_mask=mask, router_cache=rcache)
    x_last = jnp.take_along_axis(x, (n_real - 1)[None, None, None], axis=1)[:, 0]
    position = backbone.next_pos                             # position of the token sampled now
    tok, nxt, rcache2 = _sample_and_route(model, x_last, rcache, is_last[None], seed[None], position,
                                          temp[None], top_p[None])
    caches = SlotCaches(backbone=_put_rows(caches.backbone, slots, backbone),
                        router=_put_rows(caches.router, slots, rcache2))
    return _constrain(caches, layout), tok[0], nxt[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "dispatcher", "layout"), donate_argnames=("caches",))
def _decode_step(graphdef, params, layers, caches: SlotCaches, slots, tokens, experts, valid, seeds, temps,
                 top_ps, pool=None, dispatcher=None, layout=None):
    """One token for each of M picked slots: slots/tokens/experts/seeds <int32>[M], valid <bool>[M] (False:
    bucket padding, pointed at id B), temps/top_ps <f32>[M] -> (caches, next tokens [M], their experts [M]).
    ``slots`` None: M = every row (B), row i being slot i (unpicked rows invalid): no gather or scatter of
    cache rows, for steps that pick most slots. ``params``: the model's states (a tuple, merged with
    ``graphdef``). With ``pool`` (the resident expert pool, w [L, k, ...]), ``experts`` are slot ids,
    ``params`` hold no expert weights and ``layers`` only the attention weights: the step reads experts from
    the pool alone. ``layout``: as in ``_prefill_step``."""
    model = nnx.merge(graphdef, *params)
    k = None
    if pool is not None:
        k = pool["w_gate"].shape[1]
        layers = tuple({**p, **{name: pool[name][l] for name in pool}} for l, p in enumerate(layers))
    whole = slots is None                       # every row of the caches at once: no gather, no scatter
    backbone = caches.backbone if whole else _rows(caches.backbone, slots)
    mask = valid[:, None]
    x, backbone = _backbone(model, tokens[:, None], mask, jnp.where(valid, experts, -1)[:, None], backbone,
                            layers, dispatcher, k)
    tok, nxt, rcache = _sample_and_route(model, x[:, 0], caches.router if whole else _rows(caches.router, slots),
                                         valid, seeds, backbone.next_pos, temps, top_ps)
    if whole:
        return _constrain(SlotCaches(backbone=backbone, router=rcache), layout), tok, nxt
    caches = SlotCaches(backbone=_put_rows(caches.backbone, slots, backbone),
                        router=_put_rows(caches.router, slots, rcache))
    return _constrain(caches, layout), tok, nxt


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("caches",))
def _free_step(caches: SlotCaches, slot, layout=None):
    """Row ``slot`` <int32>[] forgotten: key_mask, index and next_pos back to 0 (keys and values stay)."""
    def reset(c):
        if c is None:
            return None
        return c.replace(key_mask=c.key_mask.at[slot].set(False), index=c.index.at[slot].set(0),
                         next_pos=c.next_pos.at[slot].set(0))
    return _constrain(SlotCaches(backbone=reset(caches.backbone), router=reset(caches.router)), layout)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _route_step(graphdef, params, ids, mask):
    """The router's expert of every prompt token: ids/mask [1, T] -> <int32>[1, T] (no cache: causal)."""
    return nnx.merge(graphdef, params).route(ids, attention_mask=mask)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"ModelRunner: {n} tokens exceed the largest bucket {buckets[-1]}")


class ModelRunner:
    """Owns the params, the slot caches and the compiled steps (see the module docstring)."""

    def __init__(self, model, *, num_slots: int, max_len: int, prefill_buckets: tuple[int, ...],
                 expert_slots: int | None = None, mesh: jax.sharding.Mesh | None = None,
                 dispatcher: dispatch.Dispatcher | None = None):
        if mesh is not None and expert_slots is not None:
            raise ValueError("ModelRunner: expert_slots (the resident expert pool) lives on one device and cannot "
                             "be combined with a mesh; pass one of them")
        self.num_slots, self.max_len = num_slots, max_len
        self.prefill_buckets = tuple(sorted(prefill_buckets))
        self.decode_buckets = tuple(sorted({min(1 << i, num_slots) for i in range(num_slots.bit_length() + 1)}))
        big = self.prefill_buckets[-1]
        self.route_buckets = self.prefill_buckets + tuple(big << i for i in range(1, max(1, max_len // big).bit_length() + 1)
                                                          if (big << (i - 1)) < max_len)
        self.is_moe = is_routed(model)
        self.num_experts = model.config.num_experts if self.is_moe else 0
        # decode: ``dispatcher`` (a config key; default the "decode" dispatcher, which reads only the experts
        # some slot uses), weights in its layout once; prefill chunks plan with the default for their size.
        self.dispatcher = (dispatcher or dispatch.get("decode")) if self.is_moe else None
        self.graphdef, self.params = nnx.split(model)
        if mesh is not None:                          # the params on the mesh; the layers below slice them
            self.params = sharding.place(self.params, sharding.param_shardings(self.params, mesh))
            model = nnx.merge(self.graphdef, self.params)
        self.model = model
        self.pool = None
        if expert_slots is not None:
            if not self.is_moe:
                raise ValueError("ModelRunner: expert_slots needs a Read-ME model (a dense model has no experts)")
            self.pool = ResidentPool(model.experts.arrays(), expert_slots)
            # decode: params without the experts (zero-size stand-ins), layers without expert weights
            self.decode_graphdef, experts, rest = nnx.split(model, nnx.PathContains("experts"), ...)
            stub = jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), experts)
            self.decode_params = (stub, rest)
            self.layers = unstack_layers(model.attn.arrays())
        else:
            self.decode_graphdef, self.decode_params = self.graphdef, (self.params,)
            self.layers = model.decode_layers(dispatcher=self.dispatcher) if self.is_moe else unstack_layers(model.layer_arrays())

        def init():
            return SlotCaches(backbone=model.init_backbone_cache(num_slots, max_len) if self.is_moe else
                              model.init_cache(num_slots, max_len),
                              router=model.router.init_cache(num_slots, max_len) if self.is_moe else None)
        self.layout = None                            # the caches' shardings under a mesh (cache_layout)
        if mesh is None:
            self.caches = init()
        else:                                         # made in place: never whole on one device
            self.layout = cache_layout(jax.eval_shape(init), mesh)
            self.caches = jax.jit(init, out_shardings=self.layout)()

    @property
    def scratch(self) -> int:
        """The slot id of padding (one past the last row): reads clamp it, writes to it are dropped."""
        return self.num_slots

    def route_prompt(self, prompt: list[int]) -> np.ndarray:
        """<int32>[len(prompt)]: each prompt token's expert (-1 for a dense model). One causal router pass
        over the whole prompt, padded to the smallest of ``route_buckets`` (the prefill buckets, then
        doubling up to max_len) that holds it."""
        n = len(prompt)
        if not self.is_moe:
            return np.full(n, -1, np.int32)
        T = _bucket(n, self.route_buckets)
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = prompt
        mask = np.arange(T)[None] < n
        return np.asarray(_route_step(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask)))[0, :n]

    def prefill(self, slot: int, chunk: list[int], experts: np.ndarray, is_last: bool, seed: int,
                temperature: float, top_p: float) -> tuple[int, int]:
        """Prefill ``chunk`` (continuing the slot's sequence) into ``slot``. When ``is_last``, returns the first
        sampled token and its expert; otherwise (-, -) to ignore."""
        n = len(chunk)
        T = _bucket(n, self.prefill_buckets)
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = chunk
        ex = np.full((1, T), -1, np.int32)
        ex[0, :n] = experts
        self.caches, tok, nxt = _prefill_step(
            self.graphdef, self.params, self.caches, jnp.int32(slot), jnp.asarray(ids), jnp.int32(n),
            jnp.asarray(ex), jnp.bool_(is_last), jnp.int32(seed), jnp.float32(temperature), jnp.float32(top_p),
            layout=self.layout)
        return int(tok), int(nxt)

    def decode(self, slots: list[int], tokens: list[int], experts: list[int], seeds: list[int],
               temperatures: list[float], top_ps: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """Advance each of ``slots`` by its pending token. Returns (next tokens [m], their experts [m]).
        With a resident pool every expert of ``experts`` must be resident (``pool.sync`` first)."""
        m = len(slots)
        if self.pool is not None:
            experts = self.pool.remap(experts)
        whole = 2 * m > self.num_slots               # most slots: run every row in place (see _decode_step)
        M = self.num_slots if whole else _bucket(m, self.decode_buckets)

        def arr(values, fill, dtype):
            out = np.full(M, fill, dtype)
            out[np.asarray(slots) if whole else np.arange(m)] = values
            return jnp.asarray(out)

        self.caches, tok, nxt = _decode_step(
            self.decode_graphdef, self.decode_params, self.layers, self.caches,
            None if whole else arr(slots, self.scratch, np.int32), arr(tokens, 0, np.int32),
            arr(experts, -1, np.int32), arr([True] * m, False, bool), arr(seeds, 0, np.int32),
            arr(temperatures, 0.0, np.float32), arr(top_ps, 1.0, np.float32),
            pool=None if self.pool is None else self.pool.fast, dispatcher=self.dispatcher, layout=self.layout)
        tok, nxt = jax.device_get((tok, nxt))
        rows = np.asarray(slots) if whole else np.arange(m)
        return tok[rows], nxt[rows]

    def free(self, slot: int) -> None:
        """Forget a finished slot's sequence (index, mask and position back to 0) so it can be reused."""
        self.caches = _free_step(self.caches, jnp.int32(slot), layout=self.layout)
