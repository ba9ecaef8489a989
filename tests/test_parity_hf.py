"""Logit parity with `transformers` (f32) on tiny random HF checkpoints written by transformers itself.

Each case saves a random ``LlamaForCausalLM`` / ``MistralForCausalLM`` with ``save_pretrained``, loads the
files with ``readme_jax.load_pretrained`` and compares against the torch model: plain batch, left-padded
batch with ``attention_mask``, and (one case) cached incremental decode vs full recompute.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from readme_jax.convert.load import load_pretrained  # noqa: E402

TOL = 1e-4
V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager",
            initializer_range=0.25)  # large weights: sharp attention, so RoPE details move the logits

CASES = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
    "mqa_tied_theta5e5": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0),
    "head_dim16": dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear_rope": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # dynamic NTK only differs from the default once the sequence outgrows max_position_embeddings
    "dynamic_rope": dict(num_key_value_heads=2, max_position_embeddings=8,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "sharded": dict(num_key_value_heads=2, tie_word_embeddings=False, _shard="8KB"),
    "mistral_sliding": dict(num_key_value_heads=2, sliding_window=5, _mistral=True),
}


def make_hf(tmp_path, **kw):
    """Save a random tiny HF model to tmp_path; return (torch model, directory)."""
    kw = {**BASE, **kw}
    shard = kw.pop("_shard", None)
    mistral = kw.pop("_mistral", False)
    attn = kw.pop("attn_implementation")
    cfg_cls, model_cls = ((transformers.MistralConfig, transformers.MistralForCausalLM) if mistral
                          else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw, attn_implementation=attn)).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm weight shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **save_kw)
    return model, tmp_path


def hf_logits(model, ids, mask=None):
    ids_t = torch.tensor(np.asarray(ids))
    kw = {}
    if mask is not None:
        m = torch.tensor(np.asarray(mask)).long()
        kw = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids_t, **kw).logits.float().numpy()


def _ids(T, B=2, seed=0):
    return np.random.RandomState(seed).randint(0, V, (B, T)).astype(np.int32)


def _left_pad_mask(B, T, pads):
    return np.array([[j >= p for j in range(T)] for p in pads[:B]])


@pytest.mark.slow(reason="builds and runs transformers' reference model")
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf, path = make_hf(tmp_path, **CASES[case])
    if case == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1
    model, tok = load_pretrained(path)
    assert tok is None
    T = 12  # > max_position_embeddings=8 in the dynamic case; > sliding_window in the Mistral case
    ids = _ids(T)
    ours = np.asarray(model(jnp.asarray(ids)))
    chex.assert_shape(ours, (2, T, V))
    diff = np.abs(ours - hf_logits(hf, ids)).max()
    assert diff <= TOL, f"{case}: max |logit diff| {diff:.3g}"

    if case in ("gqa_untied", "mqa_tied_theta5e5", "mistral_sliding", "llama3_rope"):
        mask = _left_pad_mask(2, T, pads=(3, 0))
        ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        ref = hf_logits(hf, ids, mask)
        diff = np.abs(ours - ref)[mask].max()
        assert diff <= TOL, f"{case} left-padded: max |logit diff| {diff:.3g}"


class CachedDecodeTest(chex.TestCase):
    """Prefill + one-token decode steps with the KV cache == one full forward (left-padded batch)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_cached_decode_matches_full_recompute(self):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            hf, path = make_hf(Path(tmp), **CASES["gqa_untied"])
            model, _ = load_pretrained(path)
        graphdef, state = nnx.split(model)
        T, P = 10, 6
        ids = jnp.asarray(_ids(T, seed=1))
        mask = jnp.asarray(_left_pad_mask(2, T, pads=(2, 0)))

        @self.variant
        def step(state, ids, mask, cache):
            return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)

        full = nnx.merge(graphdef, state)(ids, attention_mask=mask)
        cache = model.init_cache(2, T)
        logits, cache = step(state, ids[:, :P], mask[:, :P], cache)
        outs = [logits]
        for t in range(P, T):
            logits, cache = step(state, ids[:, t:t + 1], mask[:, t:t + 1], cache)
            chex.assert_shape(logits, (2, 1, V))
            outs.append(logits)
        inc = jnp.concatenate(outs, axis=1)
        m = np.asarray(mask)
        chex.assert_trees_all_close(np.asarray(inc)[m], np.asarray(full)[m], atol=1e-5, rtol=1e-5)
        ref = hf_logits(hf, np.asarray(ids), m)
        assert np.abs(np.asarray(inc) - ref)[m].max() <= TOL
