"""MoE FFN: every dispatcher equals the masked-dense reference (values; gradients for blocked and ragged)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from readme_jax.errors import ConfigError
from readme_jax.model import dispatch, moe
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import run_layers
from readme_jax.model.dispatch.blocked import padded_rows

D, FE = 16, 24


def _weights(key, E, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.normal(k1, (E, D, FE), dtype) / 4, jax.random.normal(k2, (E, D, FE), dtype) / 4,
            jax.random.normal(k3, (E, FE, D), dtype) / 5)


def _ids(kind, B, T, E, key):
    if kind == "random":
        return jax.random.randint(key, (B, T), 0, E)
    if kind == "one_expert":        # all tokens on one expert, the others empty
        return jnp.full((B, T), E - 1, jnp.int32)
    if kind == "zero_expert":       # expert 1 gets no token; ids outside [0, E) (another device's expert) -> 0
        ids = jax.random.randint(key, (B, T), 0, E)
        return jnp.where(ids == 1, 0, jnp.where(ids == 2, E, jnp.where(ids == 3, -1, ids)))
    if kind == "runs":              # long runs of one expert, as pre-gated routing produces
        return jnp.repeat(jnp.arange(B * T // 7 + 1) % E, 7)[: B * T].reshape(B, T)
    raise ValueError(kind)


CASES = [  # (ids kind, B, T, E, (block_size, tail_size)): N = B*T is never a multiple of either size
    ("random", 2, 37, 5, (16, 4)),
    ("one_expert", 3, 11, 4, (8, 4)),    # every token on one expert
    ("zero_expert", 2, 29, 6, (4, 4)),   # -1 and E ids; one level
    ("random", 1, 5, 8, (16, 4)),        # fewer tokens than experts and than one block
    ("random", 2, 7, 1, (8, 4)),         # E = 1
]


#: The dispatchers of per-expert weights (the masked kernel reads tied experts' tables instead:
#: tests/test_masked_dispatch.py).
PER_EXPERT = sorted(n for n in dispatch.DISPATCHERS if not dispatch.get(n).takes_tables)


def _dispatcher(name, sizes):
    return dispatch.Blocked(*sizes) if name == "blocked" else dispatch.get(name)


def _check_forward(variant, case, name):
    kind, B, T, E, sizes = case
    kh, kw, ki = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (B, T, D))
    wg, wu, wd = _weights(kw, E)
    ids = _ids(kind, B, T, E, ki)
    d = _dispatcher(name, sizes)

    @variant
    def f(ids, h, wg, wu, wd):
        return moe.moe_ffn(moe.plan_dispatch(ids, E, dispatcher=d), h, wg, wu, wd)

    chex.assert_trees_all_close(f(ids, h, wg, wu, wd), moe.reference_moe_ffn(ids, h, wg, wu, wd),
                                atol=1e-5, rtol=1e-5)


@pytest.mark.slow(reason="eager op-by-op: every lax.switch / loop branch compiles on each call (~40 s for the set)")
class MoeFfnEagerTest(chex.TestCase):

    @chex.variants(without_jit=True)
    @parameterized.product(case=CASES, name=PER_EXPERT)
    def test_forward_matches_reference(self, case, name):
        _check_forward(self.variant, case, name)


class MoeFfnTest(chex.TestCase):

    @chex.variants(with_jit=True)
    @parameterized.product(case=CASES, name=PER_EXPERT)
    def test_forward_matches_reference(self, case, name):
        _check_forward(self.variant, case, name)

    @chex.variants(with_jit=True)
    @parameterized.product(case=CASES[:3] + CASES[4:], name=["blocked", "ragged"])
    def test_grads_match_reference(self, case, name):
        kind, B, T, E, sizes = case
        kh, kw, ki, kc = jax.random.split(jax.random.key(1), 4)
        h = jax.random.normal(kh, (B, T, D))
        ws = _weights(kw, E)
        ids = _ids(kind, B, T, E, ki)
        cot = jax.random.normal(kc, (B, T, D))
        plan = moe.plan_dispatch(ids, E, dispatcher=_dispatcher(name, sizes))

        @self.variant
        def grads(plan, h, ws):
            return jax.grad(lambda h, ws: jnp.sum(moe.moe_ffn(plan, h, *ws) * cot), argnums=(0, 1))(h, ws)

        ref = jax.grad(lambda h, ws: jnp.sum(moe.reference_moe_ffn(ids, h, *ws) * cot), argnums=(0, 1))(h, ws)
        chex.assert_trees_all_close(grads(plan, h, ws), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,sizes", [("random", (16, 4)), ("one_expert", (16, 4)), ("runs", (16, 8)),
                                        ("random", (8, 8))])
def test_plan_covers_every_token_once(kind, sizes):
    B, T, E = 3, 23, 5
    S, s = sizes
    ids = _ids(kind, B, T, E, jax.random.key(2))
    plan = jax.jit(lambda i: dispatch.Blocked(S, s).plan(i, E))(ids)
    ragged = jax.jit(lambda i: dispatch.Ragged().plan(i, E))(ids)
    flat = np.asarray(ids).reshape(-1)
    n = flat.size
    np.testing.assert_array_equal(plan.group_sizes, np.bincount(flat, minlength=E))
    np.testing.assert_array_equal(ragged.group_sizes, np.bincount(flat, minlength=E))
    np.testing.assert_array_equal(ragged.sort_idx, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(ragged.sort_idx)[ragged.unsort_idx], np.arange(n))
    tos, sot = np.asarray(plan.token_of_slot), np.asarray(plan.slot_of_token)
    assert tos.shape == (padded_rows(n, E, s),)
    np.testing.assert_array_equal(tos[sot], np.arange(n))
    assert np.sum(tos < n) == n                                   # no token dropped, none duplicated
    # the used blocks tile the padded rows of each expert exactly once
    owner = np.full(tos.shape, -1)
    for (offsets, experts, used), rows in zip(*plan.levels):
        for off, e in zip(np.asarray(offsets)[:int(used)], np.asarray(experts)[:int(used)]):
            assert np.all(owner[off:off + rows] == -1), "blocks overlap"
            owner[off:off + rows] = e
    np.testing.assert_array_equal(owner[sot], flat)               # every token's block is its expert's
    padded = -(-np.bincount(flat, minlength=E) // s) * s
    assert np.sum(owner >= 0) == padded.sum()                     # padding < tail_size rows per expert


@pytest.mark.slow(reason="compiles the decoder stack with each MoE FFN (11 s here)")
def test_run_layers_with_moe_ffn_fn():
    """The stack's ffn_fn hook: a plan closed over by the layer scan, weights sliced per layer, grads flow
    (the default kernel; every kernel is compared with the reference above)."""
    cfg = LlamaConfig(vocab_size=32, hidden_size=D, intermediate_size=2 * FE, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    B, T, E, L = 2, 13, 4, 2
    ks = jax.random.split(jax.random.key(3), 8)
    layers = {"attn_norm": jnp.ones((L, D)), "mlp_norm": jnp.ones((L, D)),
              "wq": jax.random.normal(ks[0], (L, D, 16)) / 4, "wk": jax.random.normal(ks[1], (L, D, 8)) / 4,
              "wv": jax.random.normal(ks[2], (L, D, 8)) / 4, "wo": jax.random.normal(ks[3], (L, 16, D)) / 4}
    wg, wu, wd = zip(*(_weights(k, E) for k in jax.random.split(ks[4], L)))
    layers.update(w_gate=jnp.stack(wg), w_up=jnp.stack(wu), w_down=jnp.stack(wd))
    x = jax.random.normal(ks[5], (B, T, D))
    ids = jax.random.randint(ks[6], (B, T), 0, E)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = jnp.ones((B, T), bool)

    def loss(layers, ffn_fn):
        y, _, _ = run_layers(layers, x, positions=pos, attention_mask_=mask, cfg=cfg, ffn_fn=ffn_fn)
        return jnp.mean(y ** 2)

    ref_fn = lambda p, h: (moe.reference_moe_ffn(ids, h, p["w_gate"], p["w_up"], p["w_down"]), None)
    got = jax.jit(lambda layers: jax.value_and_grad(loss)(
        layers, moe.moe_ffn_fn(moe.plan_dispatch(ids, E, dispatcher=dispatch.Blocked(8, 4)))))(layers)
    ref = jax.jit(lambda layers: jax.value_and_grad(loss)(layers, ref_fn))(layers)
    chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)


def test_dispatcher_and_shape_errors():
    ids = jnp.zeros((1, 4), jnp.int32)
    plan = jax.jit(moe.plan_dispatch, static_argnums=1)(ids, 2)
    wg, wu, wd = _weights(jax.random.key(0), 2)
    with pytest.raises(ConfigError, match="dispatcher 'nope' is unknown"):
        dispatch.get("nope")
    with pytest.raises(ValueError, match="tokens"):
        moe.moe_ffn(plan, jnp.zeros((1, 5, D)), wg, wu, wd)
    with pytest.raises(ValueError, match="3 experts, the plan 2"):
        moe.moe_ffn(plan, jnp.zeros((1, 4, D)), *_weights(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="multiple"):
        moe.plan_dispatch(ids, 2, dispatcher=dispatch.Blocked(block_size=12, tail_size=8))
    with pytest.raises(ValueError, match="plan made by"):
        dispatch.Blocked().check_plan(dispatch.Decode().plan(ids, 2))


@pytest.mark.slow(reason="compiles every registered dispatcher's default plan (16 s here)")
def test_default_dispatchers():
    """CPU: grouped up to GROUPED_MAX_TOKENS tokens, else blocked, whose default sizes shrink for small N
    (100 tokens get blocks of 128, tails of 32); exact either way."""
    E = 5
    kw, ki, kh = jax.random.split(jax.random.key(4), 3)
    wg, wu, wd = _weights(kw, E)
    n = dispatch.GROUPED_MAX_TOKENS
    for (B, T), want in (((4, 25), dispatch.Blocked()), ((1, n + 1), dispatch.Blocked()),
                         ((1, n), dispatch.Grouped()), ((1, 1), dispatch.Grouped())):
        h = jax.random.normal(kh, (B, T, D))
        ids = jax.random.randint(ki, (B, T), 0, E)
        plan = moe.plan_dispatch(ids, E)
        assert plan.dispatcher == want
        if (B, T) == (4, 25):
            assert (plan.block_size, plan.tail_size) == (128, 32)
        got = jax.jit(moe.moe_ffn)(plan, h, wg, wu, wd)
        chex.assert_trees_all_close(got, moe.reference_moe_ffn(ids, h, wg, wu, wd), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PER_EXPERT)
def test_inactive_ids_count_for_no_expert(name):
    """-1 (an inactive serving slot) and ids >= E: output 0, and no expert counts them as in use."""
    E = 4
    ids = jnp.asarray([[-1, 2, -1, E, 2, -1]], jnp.int32)
    h = jax.random.normal(jax.random.key(6), (1, 6, D))
    plan = moe.plan_dispatch(ids, E, dispatcher=dispatch.get(name))
    np.testing.assert_array_equal(plan.group_sizes, [0, 0, 2, 0])
    y = np.asarray(jax.jit(moe.moe_ffn)(plan, h, *_weights(jax.random.key(7), E)))
    np.testing.assert_array_equal(y[0, [0, 2, 3, 5]], 0.0)
    assert np.all(np.abs(y[0, [1, 4]]) > 0)


def test_decode_split_weights_equal_stacked():
    """The decode dispatcher reads per-expert split weights (prepare_layer) as it reads stacked ones."""
    E = 3
    d = dispatch.Decode()
    wg, wu, wd = _weights(jax.random.key(8), E)
    split = d.prepare_layer({"w_gate": wg, "w_up": wu, "w_down": wd, "mlp_norm": jnp.ones(D)})
    assert len(split["w_gate"]) == E and split["w_gate"][1].shape == (D, FE) and split["mlp_norm"].shape == (D,)
    ids = jnp.asarray([[2, 0, -1, 2]], jnp.int32)
    h = jax.random.normal(jax.random.key(9), (1, 4, D))
    plan = d.plan(ids, E)
    got = jax.jit(moe.moe_ffn)(plan, h, split["w_gate"], split["w_up"], split["w_down"])
    chex.assert_trees_all_close(got, moe.reference_moe_ffn(ids, h, wg, wu, wd), atol=1e-5, rtol=1e-5)

