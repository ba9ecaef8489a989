"""Logit parity with `transformers` (f32) on tiny random HF checkpoints written by transformers itself, one
table of cases for every model family (model/families.py): Llama (GQA/MQA, tied/untied, head_dim, llama3 /
linear / dynamic RoPE, sharded files), Mistral (sliding window), Qwen2 / Qwen2.5 (q/k/v biases, theta 1e6,
tied/untied, GQA/MQA/MHA, YaRN).

Each case saves a random ``<Family>ForCausalLM`` with ``save_pretrained``, loads the files with
``readme_jax.load_pretrained`` and compares against the torch model: plain batch, left-padded batch with
``attention_mask`` (some cases), and cached incremental decode vs full recompute (one case per family that
has a variant). The max |dlogit| of every case is printed as a table at the end of the module.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (requirements-dev installs it; a skip would hide a broken install)
import transformers  # noqa: E402

from flax import nnx  # noqa: E402

from readme_jax.convert.load import load_pretrained  # noqa: E402

TOL = 1e-4
V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager",
            initializer_range=0.25)  # large weights: sharp attention, so RoPE details move the logits
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

# family -> (transformers config class, model class); case -> (family, config fields, left-padded check)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
CASES = {
    "llama/gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0), True),
    "llama/mqa_tied_theta5e5": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                              rope_theta=500000.0), True),
    "llama/head_dim16": ("llama", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False), False),
    "llama/llama3_rope": ("llama", dict(num_key_value_heads=2, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), True),
    "llama/linear_rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                          False),
    # dynamic NTK only differs from the default once the sequence outgrows max_position_embeddings
    "llama/dynamic_rope": ("llama", dict(num_key_value_heads=2, max_position_embeddings=8,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}), False),
    "llama/sharded": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, _shard="8KB"), False),
    "mistral/sliding": ("mistral", dict(num_key_value_heads=2, sliding_window=5), True),
    "qwen2/gqa_untied_theta1e6": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                rope_theta=1e6, rms_norm_eps=1e-6), True),
    # Qwen2.5-0.5B's shape in small: tied head, 7:1 GQA (here 4:1), head_dim 64 (here 16 > D / H)
    "qwen2/qwen2.5_tied_mqa": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e6,
                                             head_dim=16), True),
    "qwen2/mha_untied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False), False),
    "qwen2/yarn": ("qwen2", dict(num_key_value_heads=2, rope_theta=1e6, rope_scaling=dict(YARN)), True),
    "qwen2/yarn_mscale": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_scaling={
        **YARN, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False}), False),
    "qwen2/sharded": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False, _shard="8KB"), False),
}
DIFFS: dict[str, float] = {}      # case -> max |dlogit| (plain batch, and left-padded where checked)


@pytest.fixture(scope="module", autouse=True)
def parity_table(request):
    """Print the max |dlogit| of every case run in this module (the parity table) after its last test."""
    yield
    if DIFFS:
        lines = ["", f"parity with transformers {transformers.__version__} (f32, max |dlogit|, tol {TOL:g}):",
                 f"  {'case':<28} {'max |dlogit|':>12}"]
        lines += [f"  {case:<28} {diff:>12.2e}" for case, diff in DIFFS.items()]
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():      # shown even when the tests pass
            print("\n".join(lines))


def make_hf(tmp_path, family="llama", **kw):
    """Save a random tiny HF model of ``family`` to tmp_path; return (torch model, directory)."""
    kw = {**BASE, **kw}
    shard = kw.pop("_shard", None)
    attn = kw.pop("attn_implementation")
    cfg_name, model_name = FAMILIES[family]
    cfg_cls, model_cls = getattr(transformers, cfg_name), getattr(transformers, model_name)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw, attn_implementation=attn)).eval()
    with torch.no_grad():  # non-trivial norms and biases (both start constant), so a swapped one shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
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
    family, kw, left_padded = CASES[case]
    hf, path = make_hf(tmp_path, family, **kw)
    if "_shard" in kw:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1
    model, tok = load_pretrained(path)
    assert tok is None
    assert model.config.architecture == FAMILIES[family][1]
    assert model.config.qkv_bias == (family == "qwen2")
    T = 12  # > max_position_embeddings=8 in the dynamic case; > sliding_window in the Mistral case
    ids = _ids(T)
    ours = np.asarray(model(jnp.asarray(ids)))
    chex.assert_shape(ours, (2, T, V))
    diff = float(np.abs(ours - hf_logits(hf, ids)).max())
    DIFFS[case] = diff
    assert diff <= TOL, f"{case}: max |logit diff| {diff:.3g}"

    if left_padded:
        mask = _left_pad_mask(2, T, pads=(3, 0))
        ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        ref = hf_logits(hf, ids, mask)
        diff = float(np.abs(ours - ref)[mask].max())
        DIFFS[case] = max(DIFFS[case], diff)
        assert diff <= TOL, f"{case} left-padded: max |logit diff| {diff:.3g}"


class CachedDecodeTest(chex.TestCase):
    """Prefill + one-token decode steps with the KV cache == one full forward (left-padded batch), for a
    Llama and a Qwen2 (biases + YaRN) checkpoint."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_cached_decode_matches_full_recompute(self):
        import tempfile
        from pathlib import Path

        for case in ("llama/gqa_untied", "qwen2/yarn"):
            family, kw, _ = CASES[case]
            with tempfile.TemporaryDirectory() as tmp:
                hf, path = make_hf(Path(tmp), family, **kw)
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
            assert np.abs(np.asarray(inc) - ref)[m].max() <= TOL, case
