"""Dense SmolLM2-135M: our jitted Llama vs transformers, same weights, f32, 2 threads.

Cases (each variant of each case runs in its own fresh subprocess, so peak RSS is per variant; the
ours/baseline subprocesses alternate, ``rounds`` times, and the timings of all rounds are pooled into one
median per variant):

- ``prefill``: B=4 x T=256 random token ids, full-sequence logits f32[B, T, V] on both sides (ours:
  ``jax.jit`` of ``model(ids)``; transformers: ``model(ids, use_cache=False).logits`` under
  ``torch.inference_mode``). tok/s = B*T / median seconds. Goal: ours >= 1.15x.
- ``decode_b8``: greedy decode, B=8, a 32-token prompt then 64 new tokens; ms per decode step, prefill not
  timed. Ours: the library's ``readme_jax.generation.prefill`` then ``generation.decode`` (the whole
  decode loop in one jit, a ``lax.while_loop`` over per-layer weights split once; the cache donated).
  transformers: the same greedy loop by hand, ``model(tok, past_key_values=cache)`` with its DynamicCache
  and ``logits_to_keep=1`` (what ``generate(do_sample=False)`` runs per step, minus its Python-side logits
  processors / stopping criteria). Goal: ours >= 1.5x.
- ``decode_b1``: the same at B=1, ms/token; plus its ratio to the memory-bandwidth bound: every weight byte
  (layers + the tied embedding read by the LM head) must stream from memory once per step, so
  bound = weight bytes / bandwidth, where bandwidth is a jitted f32 reduction over a 512 MiB buffer timed
  interleaved with the decode loop in the same process. Goal: ours within 1.5x of the bound
  (ratio bound/ours >= 0.667).

Both sides decode the same prompts; the note reports how many greedy tokens agree (f32 reductions differ in
order, so near-ties may flip late tokens; a wrong weight layout gives ~0% agreement).

Weights: ``readme_jax.load_pretrained(gguf)`` when it exists; otherwise (while the loader is being written)
transformers dequantises the same GGUF once in a subprocess and its tensors are cached as an .npz in our
layout under $READMEJAX_CACHE/bench/ — the same numbers either way.
"""

from __future__ import annotations

import time

from benchmarks.common import make_row, error_row, median, run_variant

NAME = "dense"

FULL = dict(rounds=2, repeats=5, prefill=(4, 256), decode_b8=(8, 32, 64), decode_b1=(1, 32, 64))
QUICK = dict(rounds=1, repeats=2, prefill=(2, 64), decode_b8=(8, 32, 16), decode_b1=(1, 32, 16))
GOALS = {"prefill": 1.15, "decode_b8": 1.5, "decode_b1_bound": 1 / 1.5}


# ------------------------------------------------------------------------------------------ inputs
def _prompt_ids(batch: int, length: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    # Skip the first ids (special tokens) so no prompt contains BOS/EOS.
    return rng.integers(16, 49152, size=(batch, length), dtype=np.int64)


def _gguf_path() -> str:
    from readme_jax.assets import smollm2_gguf
    return str(smollm2_gguf())


# ------------------------------------------------------------------------------------ transformers
def _hf_model():
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from pathlib import Path
    p = Path(_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()


def hf_case(case: str, shape: list, repeats: int) -> dict:
    """One transformers variant (run in its own subprocess by ``run_variant``)."""
    import torch
    from benchmarks.common import set_torch_threads, time_fn
    set_torch_threads()
    t0 = time.perf_counter()
    model = _hf_model()
    load_s = time.perf_counter() - t0
    out: dict = {"load_s": load_s, "torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        if case == "prefill":
            B, T = shape
            ids = torch.from_numpy(_prompt_ids(B, T))
            times = time_fn(lambda: model(input_ids=ids, use_cache=False).logits, warmup=1, repeats=repeats)
            out.update(times=times, value=B * T / median(times))
        else:
            from transformers import DynamicCache
            B, P, N = shape
            prompt = torch.from_numpy(_prompt_ids(B, P, seed=1))

            def prefill():
                cache = DynamicCache(config=model.config)
                o = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                return o.logits[:, -1].argmax(-1), o.past_key_values

            def decode(tok, cache):
                toks = []
                for _ in range(N):
                    toks.append(tok)
                    o = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache = o.past_key_values
                    tok = o.logits[:, -1].argmax(-1)
                return torch.stack(toks, 1)

            decode(*prefill())  # warm-up
            times = []
            for _ in range(repeats):
                tok, cache = prefill()
                t = time.perf_counter()
                toks = decode(tok, cache)
                times.append((time.perf_counter() - t) / N)
            out.update(times=times, value=1e3 * median(times), tokens=toks.tolist())
    return out


# -------------------------------------------------------------------------------------------- ours
def _export_hf_weights(path: str) -> dict:
    """Fallback weights: transformers' own dequantisation of the GGUF, saved in our layout as .npz."""
    import json
    import os
    import numpy as np
    model = _hf_model()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    L = model.config.num_hidden_layers

    def stack(fmt, transpose=True):
        return np.stack([sd[fmt.format(i)].T if transpose else sd[fmt.format(i)] for i in range(L)])

    arrays = {
        "tok/embed": sd["model.embed_tokens.weight"], "tok/final_norm": sd["model.norm.weight"],
        "attn/attn_norm": stack("model.layers.{}.input_layernorm.weight", False),
        "attn/mlp_norm": stack("model.layers.{}.post_attention_layernorm.weight", False),
        "attn/wq": stack("model.layers.{}.self_attn.q_proj.weight"),
        "attn/wk": stack("model.layers.{}.self_attn.k_proj.weight"),
        "attn/wv": stack("model.layers.{}.self_attn.v_proj.weight"),
        "attn/wo": stack("model.layers.{}.self_attn.o_proj.weight"),
        "ffn/w_gate": stack("model.layers.{}.mlp.gate_proj.weight"),
        "ffn/w_up": stack("model.layers.{}.mlp.up_proj.weight"),
        "ffn/w_down": stack("model.layers.{}.mlp.down_proj.weight"),
    }
    tmp = path + ".tmp.npz"
    np.savez(tmp, __config__=np.frombuffer(json.dumps(model.config.to_dict(), default=str).encode(), np.uint8),
             **arrays)
    os.replace(tmp, path)
    return {"path": path}


def _fallback_weights_path() -> str:
    from readme_jax.assets import cache_dir
    return str(cache_dir("bench") / "smollm2_135m_f32_from_transformers.npz")


def load_ours():
    """(model, how): the real SmolLM2-135M weights in our Llama, f32."""
    import jax.numpy as jnp
    try:
        try:
            from readme_jax import load_pretrained
        except ImportError:
            from readme_jax.convert.load import load_pretrained
    except ImportError:
        load_pretrained = None
    if load_pretrained is not None:
        model, _ = load_pretrained(_gguf_path(), dtype=jnp.float32)
        return model, "load_pretrained"

    import json
    import os
    import numpy as np
    from flax import nnx
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    path = _fallback_weights_path()
    if not os.path.exists(path):
        run_variant("benchmarks.dense:_export_hf_weights", {"path": path})
    with np.load(path) as z:
        hf_cfg = json.loads(bytes(z["__config__"]).decode())
        params: dict = {}
        for key in z.files:
            if key != "__config__":
                group, name = key.split("/")
                params.setdefault(group, {})[name] = jnp.asarray(z[key])
    cfg = LlamaConfig.from_hf(hf_cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), "transformers-dequantised GGUF (load_pretrained not available yet)"


def make_decode_fns(graphdef, batch: int, prompt_len: int, new_tokens: int):
    """(prefill(state, ids) -> (last logits, cache), decode(state, last, cache) -> (tokens [B, N], cache)).

    Both are the library's own jitted halves of ``readme_jax.generate`` (greedy, no EOS stop, so every call
    runs exactly ``new_tokens`` steps; the cache is donated)."""
    import jax
    import jax.numpy as jnp
    from readme_jax import generation

    def prefill(state, ids):
        mask = jnp.ones(ids.shape, bool)
        return generation.prefill(graphdef, state, ids, mask, max_len=prompt_len + new_tokens)

    def decode(state, last, cache):
        toks, _, cache = generation.decode(graphdef, state, cache, last, jax.random.key(0), jnp.float32(0),
                                           jnp.float32(1), jnp.int32(-1), jnp.int32(0),
                                           max_new_tokens=new_tokens)
        return toks, cache

    return prefill, decode


def ours_case(case: str, shape: list, repeats: int) -> dict:
    """One variant of ours (run in its own subprocess by ``run_variant``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from benchmarks.common import bandwidth_probe, peak_rss_mb, time_fn
    t0 = time.perf_counter()
    model, how = load_ours()
    load_s = time.perf_counter() - t0
    graphdef, state = nnx.split(model)
    out: dict = {"load_s": load_s, "weights": how}
    if case == "prefill":
        B, T = shape
        ids = jnp.asarray(_prompt_ids(B, T), jnp.int32)
        fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
        t = time.perf_counter()
        jax.block_until_ready(fwd(state, ids))
        out["compile_s"] = time.perf_counter() - t
        times = time_fn(lambda: fwd(state, ids), warmup=1, repeats=repeats)
        out.update(times=times, value=B * T / median(times))
        return out

    B, P, N = shape
    prompt = jnp.asarray(_prompt_ids(B, P, seed=1), jnp.int32)
    prefill, decode = make_decode_fns(graphdef, B, P, N)
    t = time.perf_counter()
    jax.block_until_ready(decode(state, *prefill(state, prompt)))
    out["compile_s"] = time.perf_counter() - t
    decode_s, bw_s = [], []
    probe = None
    if case == "decode_b1":
        out["peak_rss_mb"] = peak_rss_mb()  # before the bandwidth buffer exists
        probe, nbytes = bandwidth_probe()
        jax.block_until_ready(probe())
    for _ in range(repeats):  # the bandwidth probe runs interleaved with the decode loop
        tok, cache = jax.block_until_ready(prefill(state, prompt))
        t = time.perf_counter()
        toks, _ = jax.block_until_ready(decode(state, tok, cache))
        decode_s.append((time.perf_counter() - t) / N)
        if probe is not None:
            t = time.perf_counter()
            jax.block_until_ready(probe())
            bw_s.append(time.perf_counter() - t)
    out.update(times=decode_s, value=1e3 * median(decode_s), tokens=np.asarray(toks).tolist())
    if probe is not None:
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        out.update(bandwidth_gbs=nbytes / median(bw_s) / 1e9, bw_times=bw_s, weight_bytes=weight_bytes)
    return out


# ----------------------------------------------------------------------------------------- runner
def _agreement(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean()) if a.shape == b.shape else float("nan")


def _first_divergence(a, b) -> int:
    """Mean over rows of the number of leading greedy tokens on which both sides agree."""
    import numpy as np
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return -1
    n = []
    for ra, rb in zip(a, b):
        diff = np.nonzero(ra != rb)[0]
        n.append(len(ra) if len(diff) == 0 else int(diff[0]))
    return float(np.mean(n))


def run(quick: bool = False) -> list[dict]:
    cfg = QUICK if quick else FULL
    rows: list[dict] = []
    specs = [("prefill", cfg["prefill"], "tok/s", True), ("decode_b8", cfg["decode_b8"], "ms/step", False),
             ("decode_b1", cfg["decode_b1"], "ms/token", False)]
    for case, shape, unit, higher in specs:
        label = {"prefill": "prefill B={}xT={}", "decode_b8": "decode B={} P={} N={}",
                 "decode_b1": "decode B={} P={} N={}"}[case].format(*shape)
        res: dict[str, list[dict]] = {"ours": [], "hf": []}
        try:
            for _ in range(cfg["rounds"]):  # alternate the variants so drifting background load hits both
                for name, target in (("ours", "benchmarks.dense:ours_case"), ("hf", "benchmarks.dense:hf_case")):
                    res[name].append(run_variant(target, {"case": case, "shape": list(shape),
                                                          "repeats": cfg["repeats"]}))
        except Exception as e:  # noqa: BLE001 - one failing case is a row, not a crash
            rows.append(error_row(NAME, label, e))
            continue
        pooled = {k: [t for r in v for t in r["times"]] for k, v in res.items()}
        if case == "prefill":
            ours_v = shape[0] * shape[1] / median(pooled["ours"])
            hf_v = shape[0] * shape[1] / median(pooled["hf"])
        else:
            ours_v, hf_v = 1e3 * median(pooled["ours"]), 1e3 * median(pooled["hf"])
        note = f"weights: {res['ours'][0]['weights']}; compile {res['ours'][0]['compile_s']:.1f}s"
        if case != "prefill":
            a, b = res["ours"][-1]["tokens"], res["hf"][-1]["tokens"]
            note += (f"; greedy tokens agree {100 * _agreement(a, b):.0f}% "
                     f"(first {_first_divergence(a, b):.0f}/{shape[2]} identical per row)")
        goal = GOALS.get(case)
        if quick:
            note += "; --quick: short case, smoke only"
        rows.append(make_row(NAME, label, ours_v, hf_v, unit, higher_is_better=higher, goal=goal, note=note))
        if case == "decode_b1":
            bw = median([r["bandwidth_gbs"] for r in res["ours"]])
            wbytes = res["ours"][0]["weight_bytes"]
            bound_ms = 1e3 * wbytes / (bw * 1e9)
            rows.append(make_row(NAME, f"decode B=1 vs bandwidth bound", ours_v, bound_ms, "ms/token",
                                 higher_is_better=False, goal=GOALS["decode_b1_bound"],
                                 note=f"baseline = bound = {wbytes / 1e6:.0f} MB weights / {bw:.1f} GB/s "
                                      f"(jitted f32 sum over 512 MiB, same process); ratio = bound/ours"))
        rss_o = max(r["peak_rss_mb"] for r in res["ours"])
        rss_h = max(r["peak_rss_mb"] for r in res["hf"])
        rows.append(make_row(NAME, f"{label} peak RSS", rss_o, rss_h, "MiB", higher_is_better=False,
                             note="max over rounds; each variant in its own fresh process; ratio = hf/ours"))
    return rows
