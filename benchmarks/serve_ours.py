"""Our side of ``benchmarks/serve.py``: the serving engine (``readme_jax.serve.engine``) in one worker
subprocess (2 XLA threads), and the step breakdown of its decode step.

Models (``setup(models={name: spec})``): "smollm2" (the pinned GGUF via ``load_pretrained``, f32), a
``load_pretrained`` path (e.g. a default-run Read-ME export), or "tiny-dense" / "tiny-readme" (random,
hidden 64, 2 layers, SmolLM2's vocabulary: the stand-in while no export exists; their timings mean nothing).
One engine per (model, slots), compiled and warmed up by ``prepare`` (both timed and reported, never in a
timed run; ``release`` shuts engines down); ``run`` gives all requests at t=0 and returns every request's tokens, the wall time and the
engine's step log of that run.

Step breakdown (``breakdown``), on ``serve/paged_runner.PagedRunner``: one full decode step of ``width``
sequences, each holding ``context`` tokens on pages taken from the engine's allocator (``KVPages.open``, so
cached prefixes they evict are evicted properly; closed afterwards), padded as the runner pads it (token
bucket N, sequence bucket S, the runner's dispatcher of N). Each jitted piece takes the weights as jit
arguments (closed over, they would be compiled-in constants) and the runner's own pools, donated and written
at the same entries every call, so every timed call sees the same shapes and lengths; all are timed
round-robin (``common.time_calls``) in this process with the engine idle:
  launch     one jitted call that does nothing (the dispatch + sync every separate call below pays once)
  embed      the token embedding of the N tokens
  upload     the host side of the step: ``pack_meta`` of the backbone (and router) metadata and copying it
             and the padded inputs to the device
  attention  the L attention blocks over the pages: q/k/v (``decoder.project_qkv``), ``paged.write_kv``,
             ``paged.paged_attention``, the o projection
  ffn        the L FFNs with their norms: ``decoder.dense_ffn``, or the routed ``moe.moe_ffn_fn`` planned by
             the dispatcher the runner picks for N tokens with the expert ids of a real full step of the run
  head       the final norm + tied LM head on the S sampling rows + per-row sampling (greedy)
  router     one router step on the S sampled tokens (``packed.route_packed``, Read-ME only)
  step       the whole ``runner.step(StepBatch).result()`` as the engine makes it (``engine_step.build_batch``)
Every piece but launch is reported net of one launch (the step pays one), so the parts add up to the step:
other = step - (launch + embed + upload + attention + ffn + head + router) is what fusing them into one
program gains or costs plus the results' copy to the host. Rule: |other| must be within 5% of the step plus
the timing noise (the sum of every timed piece's median absolute deviation over the repeats; on a shared
2-core machine a ms-scale step of a tiny model moves by more than 5% between repeats), else ``breakdown``
raises BreakdownError with the numbers (the benchmark reports the row as an error). host = engine step wall
- step (the engine's Python: scheduling, emitting, detokenising), the engine step wall being the median of the
run's steps that decode every slot and prefill nothing. An engine with ``expert_slots`` is refused (its steps
run several passes).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from readme_jax.model.protocol import is_routed

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
TINY_EXPERTS, TINY_EXPERT_DIM = 4, 64
SMOLLM2_VOCAB = 49152


def _tiny_models(vocab: int):
    """(dense Llama, ReadMe on the same base config): random, for running the Read-ME half without an export."""
    from flax import nnx

    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    from readme_jax.model.readme import ReadMe, ReadMeConfig
    from readme_jax.model.router import RouterConfig
    base = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, **TINY)
    cfg = ReadMeConfig(base=base, num_experts=TINY_EXPERTS, expert_dim=TINY_EXPERT_DIM,
                       router=RouterConfig(vocab_size=vocab, dim=32, n_heads=2, mlp_dim=64, num_experts=TINY_EXPERTS,
                                           embed_rank=8, max_len=1024))
    return Llama(base, rngs=nnx.Rngs(0)), ReadMe(cfg, rngs=nnx.Rngs(1))


def _load(spec: str, cache: dict):
    """(model, tokenizer or None, how) for a model spec (see the module docstring)."""
    import jax.numpy as jnp

    import readme_jax
    if spec in ("tiny-dense", "tiny-readme"):
        if "tiny" not in cache:
            cache["tiny"] = _tiny_models(SMOLLM2_VOCAB)
        return cache["tiny"][0 if spec == "tiny-dense" else 1], None, "random tiny (no export)"
    if spec == "smollm2":
        from readme_jax.assets import smollm2_gguf
        model, tok = readme_jax.load_pretrained(smollm2_gguf(), dtype=jnp.float32)
        return model, tok, "SmolLM2-135M-Instruct GGUF, f32"
    model, tok = readme_jax.load_pretrained(spec, dtype=jnp.float32)
    return model, tok, f"{Path(spec).name} (load_pretrained, f32)"


def _compiles() -> int:
    from readme_jax.serve import paged_runner as runner_mod
    return sum(f._cache_size() for f in (runner_mod._step, runner_mod._route))


class EngineWorker:
    """Ops called by ``benchmarks.serve.Worker`` (each returns a JSON-able dict)."""

    def __init__(self):
        from readme_jax import assets
        assets.enable_compilation_cache()          # as the server: engines of the same shapes load their buckets
        self.models, self.engines, self.prepared, self._tiny = {}, {}, {}, {}

    def load(self, models: dict) -> dict:
        """Load {name: spec} (see the module docstring) next to the models already loaded."""
        t0 = time.perf_counter()
        info = {}
        for name, spec in models.items():
            model, tok, how = _load(spec, self._tiny)
            self.models[name] = (model, tok)
            info[name] = {"how": how, "moe": is_routed(model)}
        return {"load_s": time.perf_counter() - t0, "models": info}

    # ----------------------------------------------------------------------------------------- workload
    def workload(self, corpus: str, lengths: list, model: str = "smollm2") -> dict:
        """Prompts for (prompt_len, max_tokens) pairs: request i reads the next prompt_len tokens of held-out
        domain i mod (number of domains), in file order (tokenised with ``model``'s tokenizer, no BOS)."""
        from readme_jax.data.corpus import load_corpus
        tok = self.models[model][1]
        c = load_corpus(corpus)
        domains = c.domains
        need = {d: sum(p for i, (p, _) in enumerate(lengths) if i % len(domains) == k)
                for k, d in enumerate(domains)}
        streams = {}
        for d in domains:
            ids: list[int] = []
            for text in c.texts(d, "heldout"):
                if len(ids) >= need[d]:
                    break
                ids += tok.encode(text, bos=False)
            if len(ids) < need[d]:
                raise ValueError(f"{corpus}/{d}: held-out split has {len(ids)} tokens, the workload needs {need[d]}")
            streams[d] = ids
        offsets = dict.fromkeys(domains, 0)
        requests = []
        for i, (p, n) in enumerate(lengths):
            d = domains[i % len(domains)]
            requests.append([streams[d][offsets[d]: offsets[d] + p], n])
            offsets[d] += p
        return {"requests": requests, "domains": domains}

    # ------------------------------------------------------------------------------------------- engine
    def prepare(self, model: str, slots: int, budget: int, max_len: int) -> dict:
        """Build, compile (every bucket) and warm up the engine of (model, slots); returns the timings."""
        from readme_jax.sampling import SamplingParams
        from readme_jax.serve.engine import Engine, EngineConfig
        if (model, slots) in self.engines:
            return {**self.prepared[(model, slots)], "reused": True}
        m, tok = self.models[model]
        t0 = time.perf_counter()
        eng = Engine(m, tok, EngineConfig(max_num_seqs=slots, max_num_batched_tokens=budget, max_model_len=max_len,
                                          max_queue=256))
        eng.start()
        compile_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        lens = [budget + 1] + [16] * slots                     # one chunked prefill, then a full decode batch
        t0 = time.perf_counter()
        streams = [eng.submit(rng.integers(100, 1000, n).tolist(), SamplingParams(max_tokens=3, ignore_eos=True))
                   for n in lens]
        for s in streams:
            for _ in s:
                pass
        r = eng.runner
        self.engines[(model, slots)] = eng
        self.prepared[(model, slots)] = {"compile_s": compile_s, "warmup_s": time.perf_counter() - t0,
                                         "token_buckets": list(r.token_buckets),
                                         "seq_buckets": list(r.seq_buckets), "budget": budget, "max_len": max_len}
        return {**self.prepared[(model, slots)], "reused": False}

    def release(self, keep: list) -> dict:
        """Shut down every engine but those of ``keep`` = [[model, slots], ...] (frees their caches; with none
        kept, the compiled steps too)."""
        keep = {(m, s) for m, s in keep}
        for key in [k for k in self.engines if k not in keep]:
            self.engines.pop(key).shutdown(drain_timeout=5)
            self.prepared.pop(key, None)
        if not self.engines:
            # and their compiled steps: each program holds ~800 memory mappings on XLA CPU, and a process may
            # hold vm.max_map_count (65,530 by default) of them (a later engine loads its programs from the
            # persistent compilation cache)
            import jax
            jax.clear_caches()
        return {"engines": [list(k) for k in self.engines]}

    def run(self, model: str, slots: int, requests: list) -> dict:
        """All requests at t=0, greedy, EOS off: tokens per request, wall s, this run's step log."""
        from readme_jax.sampling import SamplingParams
        eng = self.engines[(model, slots)]
        first, compiles = eng.step_count, _compiles()
        t0 = time.perf_counter()
        streams = [eng.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in requests]
        tokens, reasons = [], []
        for s in streams:
            ids, reason = [], None
            for out in s:
                ids += out.token_ids
                reason = out.finish_reason
            tokens.append(ids)
            reasons.append(reason)
        wall = time.perf_counter() - t0
        bad = [i for i, (t, (_, n)) in enumerate(zip(tokens, requests)) if len(t) != n]
        if bad or any(r != "length" for r in reasons):
            raise RuntimeError(f"engine: requests {bad[:5]} got the wrong token count; finish reasons "
                               f"{sorted(set(map(str, reasons)))}")
        steps = [{k: e[k] for k in ("seconds", "decode_tokens", "prefill_tokens", "distinct_experts",
                                    "decode_experts")} for e in eng.step_log if e["step"] > first]
        return {"wall_s": wall, "tokens": tokens, "steps": steps, "compiles_during_run": _compiles() - compiles}

    # ---------------------------------------------------------------------------------------- breakdown
    def breakdown(self, model: str, slots: int, context: int, experts: list, step_wall_s: float,
                  repeats: int = 5, width: int | None = None) -> dict:
        """Milliseconds per piece of one decode step of ``width`` sequences (default: every one of ``slots``)
        on the idle engine with ``slots`` slots (see the module docstring). experts: the expert id of each
        token in a real full step of the run (ignored for a dense model). Raises BreakdownError when the
        pieces do not add up to the step (the rule in the module docstring)."""
        eng = self.engines[(model, slots)]
        if eng.runner.pool is not None:
            raise ValueError("breakdown: an engine with expert_slots (resident pool) runs several passes a step; "
                             "time it without --expert-slots")
        width = width or slots
        ctx = int(min(context, eng.config.max_model_len - 2))
        seqs = [f"breakdown-{i}" for i in range(width)]
        for s in seqs:                          # pages from the allocator (evicting cached prefixes, as a step does)
            eng.pages.open(s, [], total=ctx + 2)    # + 2: the decode token and the router's lookahead entry
        try:
            return _breakdown(eng, seqs, ctx, experts, step_wall_s, repeats)
        finally:
            for s in seqs:
                eng.pages.close(s)


SUM_TOLERANCE = 0.05       # |other| <= 5% of step, else the breakdown is refused (see the module docstring)


def _breakdown(eng, seqs: list[str], ctx: int, experts: list, step_wall_s: float, repeats: int) -> dict:
    """``EngineWorker.breakdown`` on the pages of ``seqs`` (each holding ``ctx`` tokens' worth of pages)."""
    import jax
    import jax.numpy as jnp

    from readme_jax.model import moe
    from readme_jax.model.decoder import dense_ffn, project_qkv
    from readme_jax.model.layers import rms_norm
    from readme_jax.model.packed import head_rows, route_packed
    from readme_jax.model.paged import CHUNK_PAGES, pack_meta, paged_attention, write_kv
    from readme_jax.model.rope import rope_sin_cos
    from readme_jax.sampling import sample_rows
    from readme_jax.serve.engine_step import Row, build_batch
    from readme_jax.serve.paged_runner import BLOCK_Q, _bucket

    r = eng.runner
    cfg, graphdef, n = r.cfg, r.graphdef, len(seqs)
    S = _bucket(n, r.seq_buckets, "sequences")
    N = max(_bucket(n, r.token_buckets, "tokens"), _bucket(S, r.token_buckets, "tokens"))
    rng = np.random.default_rng(0)
    ex = np.full(n, -1, np.int32)
    if r.is_moe:
        ex[:] = (list(experts) + [0] * n)[:n]
    d = r.dispatcher(N, ex)                     # the kernel the runner picks for these experts
    layers = r.layers(d)
    prompt = rng.integers(100, 1000, ctx + 1).tolist()
    rows = [Row(s, prompt, [int(e)] * (ctx + 1), ctx, 1, True, 0, 0.0, 1.0) for s, e in zip(seqs, ex)]
    batch = build_batch(rows, eng.pages.table, r.max_pages_per_seq, r.is_moe)    # the engine's full decode step

    def host_meta():
        """The step's host side before the device: its packed metadata and padded inputs (host NumPy)."""
        meta = pack_meta(batch.q_lens, batch.kv_lens, r._tables(batch.page_tables), page_size=r.page_size,
                         num_tokens=N, num_decode=S, num_blocks=-(-N // BLOCK_Q) + min(S, N // 2), block_q=BLOCK_Q,
                         num_seqs=S)
        rmeta = pack_meta(np.ones(n), batch.kv_lens + 1, r._tables(batch.page_tables), page_size=r.page_size,
                          num_tokens=S, num_decode=S, num_blocks=0, block_q=1, num_seqs=S) if r.is_moe else None
        tokens, exs = np.zeros(N, np.int32), np.full(N, -1, np.int32)
        tokens[:n], exs[:n] = batch.tokens, batch.experts
        return meta, rmeta, tokens, exs, np.zeros(S, np.int32), np.zeros(S, np.float32), np.ones(S, np.float32)

    @jax.jit
    def take(args):
        """Receives the step's host inputs on the device (a call's argument copy), computes nothing."""
        return jax.tree.leaves(args)[0][0]

    @jax.jit
    def launch(x):
        return x + 1

    meta, rmeta, tokens, exs, zeros_i, zeros_f, ones_f = jax.block_until_ready(jax.device_put(host_meta()))
    one = jnp.int32(0)

    @jax.jit
    def embed(params, tokens):
        return nnx_merge(graphdef, params).tok.encode(tokens)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def attention(layers, kv, x, meta):
        """L blocks of attention (q/k/v, cache write, paged attention, o projection), no FFN."""
        sin, cos = rope_sin_cos(jnp.maximum(meta.positions, 0), cfg)
        kv = list(kv)
        for i, p in enumerate(layers):
            q, k, v = project_qkv(p, x, sin, cos, cfg)
            kv[i] = write_kv(kv[i], k, v, meta)
            att = paged_attention(q, kv[i], meta, chunk_pages=CHUNK_PAGES, sliding_window=cfg.sliding_window)
            x = x + att.reshape(N, -1) @ p["wo"].astype(x.dtype)
        return x, tuple(kv)

    @jax.jit
    def ffn(layers, x, exs):
        """L FFNs with their norms: dense, or routed by ``d`` (the runner's dispatcher of this bucket)."""
        f = moe.moe_ffn_fn(moe.plan_dispatch(exs, r.model.num_experts, dispatcher=d)) if r.is_moe else dense_ffn
        for p in layers:
            x = x + f(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps))[0]
        return x

    @jax.jit
    def head(params, x, meta, zeros_i, zeros_f, ones_f):
        """The final norm + LM head on the S sampling rows, and greedy per-row sampling."""
        logits = head_rows(nnx_merge(graphdef, params), x[meta.cu_q_lens[1:] - 1])
        return sample_rows(logits, zeros_i, meta.kv_lens, zeros_f, ones_f)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def route(params, rlayers, rkv, tok, rmeta):
        """One router step on the S sampled tokens (writing their router K/V)."""
        ids, rkv = route_packed(nnx_merge(graphdef, params).router, rlayers, tok, rmeta, rkv,
                                chunk_pages=CHUNK_PAGES)
        return ids, rkv

    x = jax.block_until_ready(embed(r.params, tokens))
    tok = tokens[:S]

    def run_attention():
        y, r.kv = attention(layers, r.kv, x, meta)      # the runner's pool, written at the same entries each call
        return y

    def run_route():
        ids, r.rkv = route(r.params, r.rlayers, r.rkv, tok, rmeta)
        return ids

    fns = {"launch": lambda: launch(one), "embed": lambda: embed(r.params, tokens),
           "upload": lambda: take(host_meta()), "attention": run_attention,
           "ffn": lambda: ffn(layers, x, exs), "head": lambda: head(r.params, x, meta, zeros_i, zeros_f, ones_f),
           "step": lambda: r.step(batch).result()}
    if r.is_moe:
        fns["router"] = run_route
    from benchmarks.common import median, time_calls
    walls = {k: 1e3 * np.asarray(v["wall"]) for k, v in time_calls(fns, warmup=1, repeats=repeats).items()}
    ms = {k: median(list(w)) for k, w in walls.items()}
    noise = sum(float(np.median(np.abs(w - np.median(w)))) for w in walls.values())   # MADs of every median
    for k in PARTS[1:]:                         # each timed piece paid one launch; the step pays one
        if k in ms:
            ms[k] -= ms["launch"]
    ms.setdefault("router", 0.0)
    ms["other"] = ms["step"] - sum(ms[k] for k in PARTS)
    ms["host"] = 1e3 * step_wall_s - ms["step"]
    ms["engine_step"] = 1e3 * step_wall_s
    tol = SUM_TOLERANCE * ms["step"] + noise
    out = {"ms": ms, "tolerance_ms": tol, "bucket": N, "seq_bucket": S, "context": ctx, "experts": ex.tolist(),
           "dispatcher": None if d is None else type(d).__name__}
    if abs(ms["other"]) > tol:
        raise BreakdownError(f"breakdown: the parts ({', '.join(f'{k} {ms[k]:.3f}' for k in PARTS)} ms) sum to "
                             f"{ms['step'] - ms['other']:.3f} ms, the step takes {ms['step']:.3f} ms: other = "
                             f"{ms['other']:+.3f} ms is over {SUM_TOLERANCE:.0%} of the step + the timing noise "
                             f"({noise:.3f} ms, the sum of the pieces' median absolute deviations) "
                             f"(N={N}, S={S}, context {ctx})")
    return out


PARTS = ("launch", "embed", "upload", "attention", "ffn", "head", "router")


class BreakdownError(RuntimeError):
    """A step breakdown whose timed parts do not add up to the timed step (see the module docstring)."""


def nnx_merge(graphdef, params):
    from flax import nnx
    return nnx.merge(graphdef, *params)
