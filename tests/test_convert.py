"""Converters: config parsing, HF export round trip, our orbax checkpoint round trip, GGUF tensors and
quant types, the loader registry, and the CLI's one-line errors on bad input (no half-written OUT)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import chex
import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType as Q

from readme_jax.convert.load import load_pretrained, register_loader
from readme_jax.errors import CheckpointError
from readme_jax.model.config import LlamaConfig

V, D, F, L, H, K = 97, 32, 64, 2, 4, 2
HD = D // H


def _hf_config(**kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                num_key_value_heads=K, max_position_embeddings=64, tie_word_embeddings=False,
                attn_implementation="eager")
    return transformers.LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(torch model, directory) of a random tiny untied GQA Llama saved by transformers."""
    path = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_hf_config()).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


IDS = np.random.RandomState(0).randint(0, V, (2, 7)).astype(np.int32)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.slow(reason="builds and runs transformers' reference model")
def test_config_json_both_rope_styles_parse_the_same(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    _hf_config(rope_theta=500000.0, rope_scaling=dict(rope)).save_pretrained(tmp_path)  # (it mutates the dict)
    new_style = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in new_style  # what transformers 5.x writes
    hub_style = {k: v for k, v in new_style.items() if k != "rope_parameters"}
    hub_style.update(rope_theta=500000.0, rope_scaling={**{k: v for k, v in rope.items() if k != "rope_type"},
                                                        "type": "llama3"})
    a = LlamaConfig.from_hf(new_style)
    b = LlamaConfig.from_hf(hub_style)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling_dict["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(a.to_hf()) == a


# ------------------------------------------------------------------------------------------- round trips
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "readme_jax.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow(reason="runs the CLI in a fresh process (imports jax, compiles)")
def test_export_hf_round_trip_via_cli(tiny_hf, tmp_path):
    hf, src = tiny_hf
    out = tmp_path / "exported"
    proc = _cli(src, out, "--to-hf")
    assert proc.returncode == 0, proc.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sd_back, sd = back.state_dict(), hf.state_dict()
    assert sd_back.keys() == sd.keys()
    for name in sd:
        assert torch.equal(sd_back[name], sd[name]), name
    np.testing.assert_allclose(_hf_logits(back, IDS), _hf_logits(hf, IDS), atol=1e-6)  # eager vs sdpa attention
    ours, _ = load_pretrained(out)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS))), _hf_logits(hf, IDS), atol=1e-4)


@pytest.mark.slow(reason="builds and runs transformers' reference model")
def test_export_hf_bfloat16(tiny_hf, tmp_path):
    from safetensors import safe_open

    hf, src = tiny_hf
    out = tmp_path / "bf16"
    proc = _cli(src, out, "--to-hf", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        w = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert w.dtype == jnp.bfloat16
    ref = hf.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(w.astype(np.float32), ref)


@pytest.mark.slow(reason="saves and restores an orbax checkpoint of a converted model")
def test_orbax_checkpoint_round_trip(tiny_hf, tmp_path, sentencepiece_model):
    _, src_orig = tiny_hf
    src = tmp_path / "src"
    shutil.copytree(src_orig, src)
    shutil.copy(sentencepiece_model, src / "tokenizer.model")
    out = tmp_path / "ckpt"
    proc = _cli(src, out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["readme_jax"] == {"kind": "dense", "version": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temp sibling left
    a, tok_a = load_pretrained(src)
    b, tok_b = load_pretrained(out)
    assert a.config == b.config
    chex.assert_trees_all_equal(_params(a), _params(b))
    text = "Hello world, it is 2024."
    assert tok_b is not None and tok_b.encode(text, bos=True) == tok_a.encode(text, bos=True)
    # dtype=None keeps what is stored; a dtype casts params and compute
    c, _ = load_pretrained(out, dtype=jnp.bfloat16)
    assert c.attn.wq[...].dtype == jnp.bfloat16 and c.config.dtype == "bfloat16"


def test_registered_loader_dispatch(tiny_hf, tmp_path):
    from readme_jax.convert.checkpoint import save_checkpoint

    model, _ = load_pretrained(tiny_hf[1])
    save_checkpoint(tmp_path / "toy", model, kind="toy_kind", config={"answer": 42})
    with pytest.raises(CheckpointError, match="toy_kind"):
        load_pretrained(tmp_path / "toy")
    seen = {}

    def loader(path, config, *, dtype=None, **overrides):
        seen.update(path=path, config=config, dtype=dtype)
        return "toy model"

    register_loader("toy_kind", loader)
    got, tok = load_pretrained(tmp_path / "toy", dtype=None)
    assert got == "toy model" and tok is None
    assert seen["config"] == {"answer": 42} and seen["path"] == tmp_path / "toy"


# ------------------------------------------------------------------------------------------- GGUF
def _permute_rope(w, n):
    """llama.cpp's Q/K row order (interleaved pairs), the inverse of gguf_io.unpermute_rope."""
    return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf_model, qtype=Q.F32, *, tensors=None, embd_override=None):
    """A llama GGUF holding hf_model's weights: linear weights in ``qtype``, norms in F32."""
    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    def add(name, arr, t):
        if t in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float32 if t == Q.F32 else np.float16))
        else:
            q = gguf.quants.quantize(arr, t)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)

    if embd_override is not None:
        w.add_tensor("token_embd.weight", *embd_override)
    else:
        add("token_embd.weight", sd["model.embed_tokens.weight"], qtype)
        add("output_norm.weight", sd["model.norm.weight"], Q.F32)
        if not cfg.tie_word_embeddings:
            add("output.weight", sd["lm_head.weight"], qtype)
        names = dict(input_layernorm="attn_norm", post_attention_layernorm="ffn_norm",
                     **{f"self_attn.{p}_proj": f"attn_{g}" for p, g in
                        [("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")]},
                     **{f"mlp.{p}_proj": f"ffn_{p}" for p in ("gate", "up", "down")})
        for i in range(cfg.num_hidden_layers):
            for hf_name, g_name in names.items():
                arr = sd[f"model.layers.{i}.{hf_name}.weight"]
                if hf_name == "self_attn.q_proj":
                    arr = _permute_rope(arr, cfg.num_attention_heads)
                elif hf_name == "self_attn.k_proj":
                    arr = _permute_rope(arr, cfg.num_key_value_heads)
                add(f"blk.{i}.{g_name}.weight", arr, Q.F32 if arr.ndim == 1 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_f32_matches_transformers(tmp_path):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(_hf_config(tie_word_embeddings=True)).eval()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    model, tok = load_pretrained(path)
    assert tok is None and model.config.tie_word_embeddings and model.config.num_kv_heads == K
    diff = np.abs(np.asarray(model(jnp.asarray(IDS))) - _hf_logits(hf, IDS)).max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_quant_types_dequantise(tmp_path, tiny_hf, qtype):
    hf, _ = tiny_hf
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf, qtype)
    model, _ = load_pretrained(path)
    assert not model.config.tie_word_embeddings
    for hf_name, ours in [("model.layers.1.self_attn.q_proj.weight", model.attn.wq[...][1]),
                          ("model.layers.0.self_attn.k_proj.weight", model.attn.wk[...][0]),
                          ("model.layers.1.mlp.down_proj.weight", model.ffn.w_down[...][1]),
                          ("lm_head.weight", model.tok.lm_head[...])]:
        w = hf.state_dict()[hf_name].float().numpy()
        if qtype == Q.F16:
            ref = w.astype(np.float16).astype(np.float32)
        else:  # quantisation is per row, so it commutes with llama.cpp's Q/K row permutation
            ref = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_array_equal(np.asarray(ours), ref.T, err_msg=f"{qtype.name} {hf_name}")


# ------------------------------------------------------------------------------------------- CLI errors
def _bad_inputs(tmp_path, tiny_hf):
    hf, src = tiny_hf
    from safetensors.numpy import load_file, save_file

    def hf_copy(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    cases = {}
    d = hf_copy("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated_safetensors"] = (d, ["model.safetensors", "truncated"])

    d = hf_copy("missing")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    cases["missing_tensor"] = (d, ["model.layers.1.mlp.up_proj.weight", "missing"])

    d = hf_copy("shape")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = np.zeros((D, D + 1), np.float32)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    cases["wrong_shape"] = (d, ["model.layers.0.self_attn.q_proj.weight", f"[{D}, {D + 1}]", f"[{D}, {D}]"])

    d = hf_copy("gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    cases["non_llama"] = (d, ["config.json", "GPT2LMHeadModel"])

    d = hf_copy("pickled")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cases["pickle_dir"] = (d, ["pytorch_model.bin", "refusing to unpickle", "safetensors"])
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04")
    cases["pickle_file"] = (tmp_path / "weights.pt", ["weights.pt", "refusing to unpickle"])

    g = write_tiny_gguf(tmp_path / "good.gguf", hf, Q.Q8_0)
    data = g.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 500])
    cases["truncated_gguf"] = (tmp_path / "cut.gguf", ["cut.gguf", "truncated"])

    q8k = np.zeros((V, 292), np.uint8)  # one Q8_K block (256 values) per row; no dequantiser exists
    write_tiny_gguf(tmp_path / "q8k.gguf", hf, embd_override=(q8k, (V, 292), Q.Q8_K))
    cases["unknown_quant"] = (tmp_path / "q8k.gguf", ["q8k.gguf", "token_embd.weight", "Q8_K"])
    return cases


BAD = ["truncated_safetensors", "missing_tensor", "wrong_shape", "non_llama", "pickle_dir", "pickle_file",
       "truncated_gguf", "unknown_quant"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_hf):
    return _bad_inputs(tmp_path_factory.mktemp("bad"), tiny_hf)


@pytest.mark.slow(reason="runs the CLI in a fresh process (imports jax, compiles)")
@pytest.mark.parametrize("case", BAD)
def test_cli_rejects_bad_input_with_one_line(bad_inputs, tmp_path, case):
    src, expected = bad_inputs[case]
    out = tmp_path / "OUT"
    proc = _cli(src, out)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp sibling either


def test_cli_refuses_existing_out(tiny_hf, tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _cli(tiny_hf[1], out)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
