"""Qwen2 end to end, the proof of the model-family seam (model/families.py): config.json parsing and its
refusals, HF safetensors -> ours -> HF through the convert CLI, the server on a tiny Qwen2, and the Read-ME
pipeline on a tiny Qwen2 with the server on its export. (Logit parity per config: tests/test_parity_hf.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import torch  # noqa: E402  (requirements-dev installs it; a skip would hide a broken install)
import transformers  # noqa: E402

from readme_jax.convert.load import load_pretrained  # noqa: E402
from readme_jax.errors import ConfigError  # noqa: E402
from readme_jax.generation import generate_ids  # noqa: E402
from readme_jax.model.config import LlamaConfig  # noqa: E402
from readme_jax.model.llama import Llama  # noqa: E402
from readme_jax.parallel.mesh import make_mesh  # noqa: E402
from readme_jax.parallel.sharding import axes_of, param_shardings  # noqa: E402
from readme_jax.serve.engine import Engine, EngineConfig  # noqa: E402
from readme_jax.serve.metrics import EngineMetrics  # noqa: E402
from tests.test_parity_hf import YARN, hf_logits, make_hf  # noqa: E402
from tests.test_server import Served, byte_tokenizer  # noqa: E402
from tests.tiny_models import random_model  # noqa: E402
from tests.tiny_run import REPO, train_cli  # noqa: E402

QWEN2 = "Qwen2ForCausalLM"
IDS = np.random.RandomState(0).randint(0, 97, (2, 9)).astype(np.int32)


# ------------------------------------------------------------------------------------------------ config
def test_qwen2_config_json_round_trip_and_refusals():
    hf = {"architectures": [QWEN2], "model_type": "qwen2", "vocab_size": 97, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
          "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21, "tie_word_embeddings": True}
    cfg = LlamaConfig.from_hf(hf)
    assert (cfg.architecture, cfg.qkv_bias, cfg.rope_theta, cfg.sliding_window) == (QWEN2, True, 1e6, None)
    assert cfg.rope_scaling_dict == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    out = cfg.to_hf()
    assert out["model_type"] == "qwen2" and out["use_sliding_window"] is False and "attention_bias" not in out
    assert LlamaConfig.from_hf(out) == cfg
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    no_arch = {k: v for k, v in hf.items() if k != "architectures"}                      # found by model_type
    assert LlamaConfig.from_hf(no_arch) == cfg

    with pytest.raises(ConfigError, match="use_sliding_window"):
        LlamaConfig.from_hf({**hf, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="qkv_bias=False contradicts architecture 'Qwen2ForCausalLM'"):
        LlamaConfig(architecture=QWEN2, qkv_bias=False)
    with pytest.raises(ConfigError, match="'Gemma2ForCausalLM' is not supported"):
        LlamaConfig.from_hf({**hf, "architectures": ["Gemma2ForCausalLM"]})
    with pytest.raises(ConfigError, match="attention_bias"):
        LlamaConfig.from_hf({**hf, "architectures": ["LlamaForCausalLM"], "attention_bias": True})
    assert LlamaConfig().qkv_bias is False                                   # the router trunk's Llama style


def test_qwen2_params_shard_on_an_fsdp_mesh():
    """Every Qwen2 param has logical axes (the biases from its family entry): FSDP splits D, biases replicate."""
    cfg = LlamaConfig(architecture=QWEN2, vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    for name, letters in (("attn.bq", "LQ"), ("attn.bk", "LK"), ("attn.bv", "LK")):
        assert axes_of(name, 2) == letters
    state = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(state, make_mesh({"fsdp": 8}))
    assert shardings["attn"]["wq"].spec == P(None, "fsdp", None)
    assert shardings["attn"]["bq"].spec == P(None, None) and shardings["attn"]["bv"].spec == P(None, None)


# ------------------------------------------------------------------------------------------------ convert
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "readme_jax.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow(reason="two convert CLIs in fresh processes (10 s here)")
def test_qwen2_hf_to_ours_to_hf_round_trip_via_cli(tmp_path):
    """HF Qwen2 safetensors -> our checkpoint -> HF: the same tensors (biases included), config and logits."""
    hf, src = make_hf(tmp_path / "src", "qwen2", num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6,
                      rope_scaling=dict(YARN))
    ours_dir, back_dir = tmp_path / "ours", tmp_path / "back"
    for args in ((src, ours_dir), (ours_dir, back_dir, "--to-hf")):
        proc = _cli(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((ours_dir / "config.json").read_text())["architecture"] == QWEN2
    back = transformers.AutoModelForCausalLM.from_pretrained(back_dir, dtype=torch.float32).eval()
    assert type(back).__name__ == QWEN2
    assert back.config.rope_parameters["rope_type"] == "yarn" and back.config.rope_parameters["factor"] == 4.0
    sd_back, sd = back.state_dict(), hf.state_dict()
    assert sd_back.keys() == sd.keys() and "model.layers.1.self_attn.k_proj.bias" in sd
    for name in sd:
        assert torch.equal(sd_back[name], sd[name]), name
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-5)   # sdpa vs eager attention
    ours, _ = load_pretrained(ours_dir)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS))), hf_logits(hf, IDS), atol=1e-4)


def test_qwen2_gguf_matches_transformers(tmp_path):
    """A qwen2 GGUF (llama.cpp's layout: Q/K rows not permuted, q/k/v biases, ``qwen2.*`` metadata) loads to
    the HF model's logits."""
    import gguf
    hf, _ = make_hf(tmp_path / "src", "qwen2", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
    cfg, sd = hf.config, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    path = tmp_path / "tiny-qwen2.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in ((w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, 64),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_rope_freq_base, 1e6), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps)):
        add(value)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             **{f"self_attn.{p}_proj.{kind}": f"attn_{g}.{kind}" for p, g in (("q", "q"), ("k", "k"), ("v", "v"))
                for kind in ("weight", "bias")},
             "self_attn.o_proj.weight": "attn_output.weight",
             **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in names.items():
            w.add_tensor(f"blk.{i}.{g_name}", sd[f"model.layers.{i}.{hf_name}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, _ = load_pretrained(path)
    assert model.config.architecture == QWEN2 and model.config.rope_theta == 1e6
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), hf_logits(hf, IDS), atol=1e-4)


# ------------------------------------------------------------------------------------------------ serving
def _served_completion_matches_greedy(model, tokenizer, prompt: list[int], n: int) -> None:
    """Serve ``model`` on a free 127.0.0.1 port; a greedy completion of ``prompt`` == offline greedy decode."""
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, default_max_tokens=n)
    metrics = EngineMetrics()
    served = Served(Engine(model, tokenizer, config, metrics=metrics), metrics, tokenizer, max_model_len=64)
    try:
        out = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                               extra_body={"ignore_eos": True})
    finally:
        served.stop()
    assert out.usage.completion_tokens == n and out.choices[0].finish_reason == "length"
    assert out.choices[0].text == tokenizer.decode(generate_ids(model, [prompt], n)[0], skip_special=True)


@pytest.mark.slow(reason="warms up a paged engine behind the server (13 s here)")
def test_server_completion_on_a_tiny_dense_qwen2():
    tok = byte_tokenizer()
    cfg = LlamaConfig(architecture=QWEN2, vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e6,
                      max_position_embeddings=64, tie_word_embeddings=True)
    model = random_model(lambda rngs: Llama(cfg, rngs=rngs), seed=1, std=0.3)
    assert model.attn.bq[...].shape == (2, 32) and model.attn.bk[...].shape == (2, 16)
    _served_completion_matches_greedy(model, tok, [40, 50, 60, 70], 6)


# ------------------------------------------------------------------------------------------------ Read-ME
@pytest.mark.slow(reason="the whole tiny pipeline in a subprocess (~50 s of CPU): compiles of every stage's steps")
def test_read_me_pipeline_and_server_on_a_tiny_qwen2(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, f"model.random.architecture={QWEN2}", "model.random.rope_theta=1000000.0",
                     "train.rounds=1", "eval.each_round=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense = json.loads((run_dir / "dense" / "config.json").read_text())
    assert dense["architecture"] == QWEN2 and dense["qkv_bias"] is True
    model, tok = load_pretrained(run_dir / "export", dtype=None)
    assert model.config.base.architecture == QWEN2 and model.router.config.trunk_config().qkv_bias is False
    dense_model, _ = load_pretrained(run_dir / "dense", dtype=None)
    for name in ("bq", "bk", "bv"):      # carried from the dense parent, then trained with the experts
        tuned, parent = (np.asarray(getattr(m.attn, name)[...]) for m in (model, dense_model))
        assert tuned.shape == parent.shape and 0 < np.abs(tuned - parent).max() < 0.1, name
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    r0 = json.loads((run_dir / "eval" / "router_0.json").read_text())
    assert all(final["ppl"][d]["ppl"] < r0["ppl"][d]["ppl"] for d in final["ppl"])     # expert tuning helps
    _served_completion_matches_greedy(model, tok, tok.encode("alpha beta")[:8], 6)
