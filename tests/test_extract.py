"""Extraction: the statistics pass, the masks, and the experts materialised from a dense model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.extract import stats
from readme_jax.extract.experts import materialize_experts, readme_from_dense
from readme_jax.extract.masks import ExpertMasks, build_masks
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import positions_from_mask, run_layers
from readme_jax.model.layers import swiglu_hidden
from readme_jax.model.llama import Llama
from readme_jax.model.router import RouterConfig
from tests.tiny_models import random_model

CFG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def dense():
    return random_model(lambda rngs: Llama(CFG, rngs=rngs))


def _down_inputs(model, ids, mask):
    """<float32>[L, B, T, F] down_proj inputs, collected through the aux of the dense stack."""
    def ffn(p, h):
        act = swiglu_hidden(h, p["w_gate"], p["w_up"])
        return act @ p["w_down"], act
    run = jax.jit(lambda i, m: model.hidden_states(i, attention_mask=m, ffn_fn=ffn)[2])
    acts = run(jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(acts, np.float64)


def test_channel_scores_match_numpy_with_padding(dense):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 64, (3, 8)).astype(np.int32) for _ in range(3)]
    masks = [np.ones((3, 8), bool) for _ in range(3)]
    masks[0][0, :3] = False                       # left padding
    masks[1][2, :6] = False
    batches = [{"input_ids": ids[0], "attention_mask": masks[0]},
               (ids[1], masks[1]),
               {"input_ids": ids[2], "loss_mask": masks[2].astype(np.float32)}]
    before = stats._accumulate._cache_size()
    got = stats.channel_scores(dense, batches, progress=False)
    assert stats._accumulate._cache_size() - before <= 1          # one compile for one batch shape
    total, count = np.zeros((CFG.num_layers, CFG.intermediate_size)), 0
    for i, m in zip(ids, masks):
        act = _down_inputs(dense, i, m)                               # [L, B, T, F]
        total += np.abs(act)[:, m].sum(1)
        count += m.sum()
    assert got.dtype == np.float32 and got.shape == (CFG.num_layers, CFG.intermediate_size)
    np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-7)

    domains, per = stats.domain_scores(dense, {"b": batches[1:2], "a": batches[:1]}, progress=False)
    assert domains == ["b", "a"] and per.shape == (2, CFG.num_layers, CFG.intermediate_size)
    np.testing.assert_allclose(per[1], stats.channel_scores(dense, batches[:1], progress=False), rtol=1e-6)


def test_channel_scores_rejects_empty(dense):
    with pytest.raises(ValueError, match="no counted token"):
        stats.channel_scores(dense, [{"input_ids": np.zeros((1, 4), np.int32),
                                      "loss_mask": np.zeros((1, 4))}], progress=False)


def test_mask_invariants():
    rng = np.random.default_rng(1)
    E, L, F = 3, 4, 30
    scores = rng.random((E, L, F)).astype(np.float32)
    scores[:, 0] = 1.0                                               # all tied in layer 0
    m = build_masks(scores, 0.5, domains=["x", "y", "z"])
    k = 15
    assert m.expert_dim == k and np.all(m.domain.sum(-1) == k)
    np.testing.assert_array_equal(m.domain[:, 0], np.broadcast_to(np.arange(F) < k, (E, F)))  # ties -> low index
    np.testing.assert_array_equal(m.shared, m.domain[0] & m.domain[1] & m.domain[2])
    assert not np.any(m.specific & m.shared[None])
    np.testing.assert_array_equal(m.specific | m.shared[None], m.domain)
    for e in range(E):                                               # the top-k really are the largest
        for l in range(1, L):
            kept, dropped = scores[e, l][m.domain[e, l]], scores[e, l][~m.domain[e, l]]
            assert kept.min() >= dropped.max()
    ch = m.expert_channels()
    assert ch.shape == (L, E, k) and ch.dtype == np.int32
    assert np.all(np.diff(ch, axis=-1) > 0)
    for l in range(L):
        for e in range(E):
            np.testing.assert_array_equal(ch[l, e], np.nonzero(m.domain[e, l])[0])
    two = build_masks(scores[:2], 0.4)                                # E = 2: specific masks are disjoint
    assert np.all(two.domain.sum(-1) == 12)
    assert not np.any(two.specific[0] & two.specific[1])
    assert build_masks(scores, 1.0).shared.all()


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, float("nan")])
def test_bad_keep_ratio(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        build_masks(np.ones((2, 1, 8)), ratio)


def test_mask_errors_and_roundtrip(tmp_path, dense):
    scores = np.random.default_rng(2).random((2, 3, 10))
    with pytest.raises(ValueError, match="domain names"):
        build_masks(scores, 0.5, domains=["only_one"])
    with pytest.raises(ValueError, match=r"\[E, L, F\]"):
        build_masks(scores[0], 0.5)
    m = build_masks(scores, 0.7, domains=["a", "b"])
    m.save(tmp_path / "masks.npz")
    back = ExpertMasks.load(tmp_path / "masks.npz")
    np.testing.assert_array_equal(back.domain, m.domain)
    assert back.domains == ("a", "b")
    with pytest.raises(ValueError, match="num_experts"):
        readme_from_dense(dense, build_masks(np.ones((2, 2, 32)), 0.5),
                          RouterConfig(vocab_size=64, dim=16, mlp_dim=16, num_experts=3), rngs=nnx.Rngs(0))


def test_report_paper_scale():
    """Llama-2-7B with 7 experts of 5504 channels: the paper's "4.7B-17B" (ours: 4.6B-17.5B + router)."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, tie_word_embeddings=False)
    m = build_masks(np.random.default_rng(3).random((7, 32, 11008)), 0.5)
    r = m.report(cfg, router_params=RouterConfig.paper_table1().num_params())
    assert r["expert_dim"] == 5504 and len(r["shared"]) == 32 and np.array(r["specific"]).shape == (7, 32)
    assert 4.5e9 < r["active_params"] < 4.8e9 and 17.0e9 < r["total_params"] < 18.0e9
    assert r["dense_params"] == 6_738_415_616                        # Llama-2-7B's published count


def test_readme_from_dense_equals_masked_dense(dense):
    """Oracle routing: ReadMe logits == the dense model with its FFN intermediate x (shared + mask_e(t))."""
    E = 3
    rng = np.random.default_rng(4)
    m = build_masks(rng.random((E, CFG.num_layers, CFG.intermediate_size)), 0.5)
    moe_model = readme_from_dense(dense, m, RouterConfig(vocab_size=64, dim=16, n_heads=2, mlp_dim=16,
                                                         num_experts=E, embed_rank=8), rngs=nnx.Rngs(5))
    ids = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    expert_ids = jnp.asarray(rng.integers(0, E, (2, 9)), jnp.int32)
    keep = jnp.asarray(m.domain, jnp.float32)                         # [E, L, F] = shared + mask_e


    def masked_dense(p, h):
        act = swiglu_hidden(h, p["w_gate"], p["w_up"])
        return (act * p["keep"][expert_ids]) @ p["w_down"], None

    arrays = {**dense.layer_arrays(), "keep": jnp.swapaxes(keep, 0, 1)}   # [L, E, F]
    mask = jnp.ones(ids.shape, bool)

    @jax.jit
    def reference(arrays, ids):
        x, _, _ = run_layers(arrays, dense.tok.encode(ids), positions=positions_from_mask(mask),
                             attention_mask_=mask, cfg=CFG, ffn_fn=masked_dense)
        return dense.tok.decode(x)

    want = reference(arrays, ids)
    got = jax.jit(lambda ids, e: moe_model(ids, expert_ids=e))(ids, expert_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)

    w = materialize_experts(dense.ffn.arrays(), m)
    Fe = m.expert_dim
    assert w["w_gate"].shape == (CFG.num_layers, E, CFG.hidden_size, Fe)
    assert w["w_down"].shape == (CFG.num_layers, E, Fe, CFG.hidden_size)
    ch = m.expert_channels()
    np.testing.assert_array_equal(np.asarray(w["w_up"][1, 2]), np.asarray(dense.ffn.w_up[...][1][:, ch[1, 2]]))
    np.testing.assert_array_equal(np.asarray(w["w_down"][0, 1]), np.asarray(dense.ffn.w_down[...][0][ch[0, 1]]))
    # the embedding, attention and norms are the dense model's
    np.testing.assert_array_equal(np.asarray(moe_model.attn.wq[...]), np.asarray(dense.attn.wq[...]))
    assert jax.tree.leaves(nnx.state(moe_model.tok))[0].shape == dense.tok.embed[...].shape
