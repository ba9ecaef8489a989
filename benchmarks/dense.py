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

Weights: the pinned SmolLM2 GGUF, dequantised by ``readme_jax.load_pretrained`` (ours) and by transformers.
Every timing goes through :func:`benchmarks.common.time_calls`.
"""

from __future__ import annotations

import time

from benchmarks.common import error_row, make_row, median, run_variant

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
    from benchmarks.common import Timed, set_torch_threads, time_calls
    set_torch_threads()
    t0 = time.perf_counter()
    model = _hf_model()
    load_s = time.perf_counter() - t0
    out: dict = {"load_s": load_s, "torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        if case == "prefill":
            B, T = shape
            ids = torch.from_numpy(_prompt_ids(B, T))
            times = time_calls({"prefill": lambda: model(input_ids=ids, use_cache=False).logits},
                               repeats=repeats)["prefill"]["wall"]
            out.update(times=times, value=B * T / median(times))
        else:
            from transformers import DynamicCache
            B, P, N = shape
            prompt = torch.from_numpy(_prompt_ids(B, P, seed=1))
            toks = []

            def prefill():
                cache = DynamicCache(config=model.config)
                o = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                return o.logits[:, -1].argmax(-1), o.past_key_values

            def decode(tok, cache):
                toks.clear()
                for _ in range(N):
                    toks.append(tok)
                    o = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache = o.past_key_values
                    tok = o.logits[:, -1].argmax(-1)

            times = time_calls({"decode": Timed(decode, setup=prefill, per_call=N)},
                               repeats=repeats)["decode"]["wall"]
            out.update(times=times, value=1e3 * median(times), tokens=torch.stack(toks, 1).tolist())
    return out


# -------------------------------------------------------------------------------------------- ours
def load_ours():
    """The real SmolLM2-135M weights in our Llama, f32 (``readme_jax.load_pretrained`` of the pinned GGUF)."""
    import jax.numpy as jnp
    from readme_jax import load_pretrained
    model, _ = load_pretrained(_gguf_path(), dtype=jnp.float32)
    return model


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
    from benchmarks.common import Timed, bandwidth_probe, peak_rss_mb, time_calls
    t0 = time.perf_counter()
    model = load_ours()
    load_s = time.perf_counter() - t0
    graphdef, state = nnx.split(model)
    out: dict = {"load_s": load_s}
    if case == "prefill":
        B, T = shape
        ids = jnp.asarray(_prompt_ids(B, T), jnp.int32)
        fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
        t = time.perf_counter()
        jax.block_until_ready(fwd(state, ids))
        out["compile_s"] = time.perf_counter() - t
        times = time_calls({"prefill": lambda: fwd(state, ids)}, repeats=repeats)["prefill"]["wall"]
        out.update(times=times, value=B * T / median(times))
        return out

    B, P, N = shape
    prompt = jnp.asarray(_prompt_ids(B, P, seed=1), jnp.int32)
    prefill, decode = make_decode_fns(graphdef, B, P, N)
    t = time.perf_counter()
    jax.block_until_ready(decode(state, *prefill(state, prompt)))
    out["compile_s"] = time.perf_counter() - t
    toks = []

    def run_decode(tok, cache):
        res = decode(state, tok, cache)         # (tokens [B, N], cache): both blocked on by time_calls
        toks[:] = [res[0]]
        return res

    calls = {"decode": Timed(run_decode, setup=lambda: prefill(state, prompt), per_call=N)}
    if case == "decode_b1":    # the bandwidth probe runs interleaved with the decode loop
        out["peak_rss_mb"] = peak_rss_mb()  # before the bandwidth buffer exists
        probe, nbytes = bandwidth_probe()
        jax.block_until_ready(probe())
        calls["bandwidth"] = probe
    times = time_calls(calls, warmup=0, repeats=repeats)
    decode_s = times["decode"]["wall"]
    out.update(times=decode_s, value=1e3 * median(decode_s), tokens=np.asarray(toks[0]).tolist())
    if "bandwidth" in times:
        bw_s = times["bandwidth"]["wall"]
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
        note = f"compile {res['ours'][0]['compile_s']:.1f}s"
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
            rows.append(make_row(NAME, "decode B=1 vs bandwidth bound", ours_v, bound_ms, "ms/token",
                                 higher_is_better=False, goal=GOALS["decode_b1_bound"],
                                 note=f"baseline = bound = {wbytes / 1e6:.0f} MB weights / {bw:.1f} GB/s "
                                      f"(jitted f32 sum over 512 MiB, same process); ratio = bound/ours"))
        rss_o = max(r["peak_rss_mb"] for r in res["ours"])
        rss_h = max(r["peak_rss_mb"] for r in res["hf"])
        rows.append(make_row(NAME, f"{label} peak RSS", rss_o, rss_h, "MiB", higher_is_better=False,
                             note="max over rounds; each variant in its own fresh process; ratio = hf/ours"))
    return rows
