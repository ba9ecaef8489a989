"""The Read-ME model: one routing per call shared by every layer, routing apart from the backbone, cached
decode, save -> load_pretrained."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import readme_jax
from readme_jax.convert.readme_checkpoint import save_readme
from readme_jax.model import dispatch, moe
from readme_jax.model.config import LlamaConfig
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from tests.tiny_models import greedy_by_recompute, random_model

E = 3
CFG = ReadMeConfig(
    base=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                     num_kv_heads=1, head_dim=8, max_position_embeddings=64),
    num_experts=E, expert_dim=12,
    router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=E, embed_rank=4, max_len=64),
    domains=("a", "b", "c"))


@pytest.fixture(scope="module")
def model():
    # larger router weights than the 0.02 init, so that its choices vary with the tokens
    return random_model(lambda rngs: ReadMe(CFG, rngs=rngs),
                        overrides={"router.embed": 0.6, "router.embed_proj": 0.6, "router.head": 0.6})


def _ids(seed, shape=(2, 10)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 40, shape), jnp.int32)


def test_config_roundtrip_and_counts(model):
    assert ReadMeConfig.from_dict(CFG.to_dict()) == CFG
    b = CFG.base
    one_expert = 3 * b.num_layers * b.hidden_size * CFG.expert_dim
    assert model.num_params() - model.active_params() == (E - 1) * one_expert
    assert model.experts.w_gate[...].shape == (3, E, 16, 12) and model.experts.w_down[...].shape == (3, E, 12, 16)
    with pytest.raises(ValueError, match="num_experts"):
        CFG.replace(num_experts=4)


@pytest.mark.slow(reason="compiles the Read-ME NLL with and without routes (14 s here)")
def test_token_nll_matches_the_logits_for_router_and_given_routes(model):
    from readme_jax.model.head_loss import nll_from_logits
    ids = _ids(7)
    targets = jnp.roll(ids, -1, axis=1)
    for e in (None, 2, jnp.asarray(np.random.default_rng(8).integers(0, E, ids.shape), jnp.int32)):
        chex.assert_trees_all_close(model.token_nll(ids, targets, expert_ids=e),
                                    nll_from_logits(model(ids, expert_ids=e), targets), rtol=1e-5, atol=1e-5)


def test_every_layer_sees_the_same_expert_ids(model, monkeypatch):
    """plan_dispatch runs once per call, outside the scan, and each layer's FFN gets that one plan."""
    calls = []
    real = moe.plan_dispatch
    monkeypatch.setattr(moe, "plan_dispatch", lambda *a, **k: calls.append(1) or real(*a, **k))

    def probe(plan):
        ffn = moe.moe_ffn_fn(plan)

        def layer(p, h):
            y, _ = ffn(p, h)
            return y, plan.expert_ids             # each token's expert, read back from this layer's plan
        return layer

    ids = _ids(0)
    routed = np.asarray(jax.jit(model.route)(ids)).reshape(-1)
    assert len(np.unique(routed)) > 1
    fixed = jnp.asarray(np.random.default_rng(1).integers(0, E, ids.shape), jnp.int32)
    looped = nnx.merge(*nnx.split(model))
    looped.config = CFG.replace(base=CFG.base.replace(scan_layers=False))
    # the router's ids through the scanned stack; oracle ids through the Python-loop stack
    for m, given, want in ((model, None, routed), (looped, fixed, np.asarray(fixed).reshape(-1))):
        calls.clear()
        _, _, aux = jax.jit(lambda ids, e: m.hidden_states(ids, expert_ids=e, ffn_fn=probe,
                                                           dispatcher=dispatch.Decode()))(ids, given)
        assert len(calls) == 1
        aux = np.asarray(aux)
        assert aux.shape == (CFG.base.num_layers, ids.size)
        for layer in aux:
            np.testing.assert_array_equal(layer, want)


def test_router_default_and_oracle_routing(model):
    ids = _ids(2)

    @jax.jit
    def forms(ids):
        return (model(ids), model(ids, expert_ids=model.route(ids)),
                model(ids, expert_ids=1), model(ids, expert_ids=jnp.ones(ids.shape, jnp.int32)))

    routed, oracle, const, ones = (np.asarray(x) for x in forms(ids))
    np.testing.assert_allclose(routed, oracle, atol=1e-6)
    np.testing.assert_allclose(const, ones, atol=1e-6)
    assert not np.allclose(routed, const)
    with pytest.raises(ValueError, match="outside"):
        model(ids, expert_ids=E)
    with pytest.raises(ValueError, match="shape"):
        model(ids, expert_ids=jnp.zeros((2, 3), jnp.int32))


def test_cached_decode_equals_full(model):
    T, P = 9, 4
    ids = _ids(3, (2, T))
    mask = np.ones((2, T), bool)
    mask[0, :2] = False                                                # left padding
    full = np.asarray(jax.jit(lambda ids, m: model(ids, attention_mask=m))(ids, jnp.asarray(mask)))

    step = jax.jit(lambda ids, m, c: model(ids, attention_mask=m, cache=c))
    cache = model.init_cache(2, 16)
    logits, cache = step(ids[:, :P], jnp.asarray(mask[:, :P]), cache)
    outs = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = step(ids[:, t:t + 1], jnp.ones((2, 1), bool), cache)
        outs.append(np.asarray(logits))
    inc = np.concatenate(outs, axis=1)
    assert np.all(np.asarray(cache.router.index) == T) and np.all(np.asarray(cache.backbone.index) == T)
    np.testing.assert_allclose(inc[mask], full[mask], atol=2e-5, rtol=2e-5)


@pytest.mark.slow(reason="compiles the backbone and the routed call (13 s here)")
def test_backbone_never_routes_and_equals_the_routed_call(model):
    """backbone(expert_ids=router's ids) == the routed call; a prebuilt plan == its ids; the dispatchers agree,
    -1 ids included; a routed call is refused a plan and expert ids together."""
    ids = _ids(5)
    routed = model.route(ids)

    @jax.jit
    def forms(ids, routed):
        by_ids, _, _ = model.backbone(ids, expert_ids=routed)
        plan = moe.plan_dispatch(routed, E, dispatcher=dispatch.Blocked())
        by_plan, _, _ = model.backbone(ids, plan=plan)
        return model(ids), model.tok.decode(by_ids), model.tok.decode(by_plan)

    full, by_ids, by_plan = (np.asarray(x) for x in forms(ids, routed))
    np.testing.assert_allclose(by_ids, full, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(by_plan, full, atol=1e-5, rtol=1e-5)
    inactive = routed.at[0, 3:6].set(-1)
    # every registered dispatcher that runs per-expert weights (the masked kernel reads tied experts' tables:
    # tests/test_masked_dispatch.py compares it on a tied model)
    names = [n for n in dispatch.DISPATCHERS.names() if not dispatch.get(n).takes_tables]
    x = {name: np.asarray(jax.jit(lambda i, e, d=dispatch.get(name): model.backbone(i, expert_ids=e, dispatcher=d)[0])(
        ids, inactive)) for name in names}
    for name in names:                                        # every one of them agrees
        np.testing.assert_allclose(x[name], x["blocked"], atol=1e-5, rtol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="exactly one of plan= or expert_ids="):
        model.backbone(ids)
    with pytest.raises(ValueError, match="plan made by"):
        model.backbone(ids, plan=dispatch.Decode().plan(routed, E), dispatcher=dispatch.Blocked())


def test_route_apart_from_run_with_caches(model):
    """Serving's way: an incremental router step per new token (own cache), then the backbone on its own
    cache with those ids (decode dispatcher, split layers): the same ids and logits as the full routed call."""
    T, P = 9, 5
    ids = _ids(6, (2, T))
    mask = np.ones((2, T), bool)
    mask[1, :3] = False                                                # left padding
    full_ids = np.asarray(jax.jit(lambda i, m: model.route(i, attention_mask=m))(ids, jnp.asarray(mask)))
    full = np.asarray(jax.jit(lambda i, m: model(i, attention_mask=m))(ids, jnp.asarray(mask)))

    @jax.jit
    def step(new, m, rcache, bcache):
        e, rcache = model.route(new, attention_mask=m, router_cache=rcache)
        layers = model.decode_layers(dispatcher=dispatch.Decode())
        x, bcache, _ = model.backbone(new, expert_ids=e, cache=bcache, attention_mask=m, layers=layers,
                                      dispatcher=dispatch.Decode())
        return e, model.tok.decode(x), rcache, bcache

    rcache, bcache = model.router.init_cache(2, 16), model.init_backbone_cache(2, 16)
    e, logits, rcache, bcache = step(ids[:, :P], jnp.asarray(mask[:, :P]), rcache, bcache)
    got_ids, got = [np.asarray(e)], [np.asarray(logits)]
    for t in range(P, T):
        e, logits, rcache, bcache = step(ids[:, t:t + 1], jnp.ones((2, 1), bool), rcache, bcache)
        got_ids.append(np.asarray(e))
        got.append(np.asarray(logits))
    np.testing.assert_array_equal(np.concatenate(got_ids, 1)[mask], full_ids[mask])
    np.testing.assert_allclose(np.concatenate(got, 1)[mask], full[mask], atol=2e-5, rtol=2e-5)


def test_save_load_pretrained_same_logits(model, tmp_path):
    out = save_readme(model, tmp_path / "ckpt")
    import json
    marker = json.loads((out / "config.json").read_text())["readme_jax"]
    assert marker == {"kind": "readme", "version": 1}
    loaded, tokenizer = readme_jax.load_pretrained(out)
    assert isinstance(loaded, ReadMe) and tokenizer is None and loaded.config == CFG
    ids = _ids(4)
    fwd = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(fwd(*nnx.split(loaded), ids)), np.asarray(fwd(*nnx.split(model), ids)))


def test_generate_with_router_equals_greedy_recompute(model):
    """The jitted decode loop (router KV cache + per-layer weights) == greedy by full recomputation."""
    from readme_jax.generation import generate_ids
    prompts = [[3, 7, 11, 2], [5, 1]]
    assert generate_ids(model, prompts, 5) == greedy_by_recompute(model, prompts, 5)
