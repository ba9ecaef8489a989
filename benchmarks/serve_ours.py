"""Our side of ``benchmarks/serve.py``: the serving engine (``readme_jax.serve.engine``) in one worker
subprocess (2 XLA threads), and the step breakdown of its decode step.

Models (``setup(models={name: spec})``): "smollm2" (the pinned GGUF via ``load_pretrained``, f32), a
``load_pretrained`` path (e.g. a default-run Read-ME export), or "tiny-dense" / "tiny-readme" (random,
hidden 64, 2 layers, SmolLM2's vocabulary: the stand-in while no export exists; their timings mean nothing).
One engine per (model, slots), compiled and warmed up by ``prepare`` (both timed and reported, never in a
timed run; ``release`` shuts engines down); ``run`` gives all requests at t=0 and returns every request's tokens, the wall time and the
engine's step log of that run.

Step breakdown (``breakdown``): at the shapes of a full decode step (M = the decode bucket of ``slots``,
cache rows of max_len slots filled to the run's median context), each jitted piece is timed round-robin
in this process with the engine idle:
  attention  the L attention blocks with their cache writes (``decoder.run_layers`` with a zero FFN)
  ffn        the L FFNs: ``decoder.dense_ffn``, or the routed ``moe.moe_ffn_fn`` on the expert ids of a
             real full step of the run (their plan built once, as the backbone does)
  head       the tied LM head + per-row sampling (``sampling.sample_rows``, greedy)
  router     one incremental router step over M tokens on the router's cache (Read-ME only)
  step       the whole ``runner.decode`` call as the engine makes it
and attributed as other = step - (attention + ffn + head + router) (embedding, slot-row gather/scatter of
the caches, host<->device copies) and host = engine step wall - step (the engine's Python: scheduling,
emitting, detokenising), the engine step wall being the median of the run's steps that decode every slot
and prefill nothing.
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


def _median_s(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each no-argument callable, timed round-robin after one warm-up round."""
    from benchmarks.common import median, time_calls
    return {k: median(v["wall"]) for k, v in time_calls(fns, warmup=1, repeats=repeats).items()}


class EngineWorker:
    """Ops called by ``benchmarks.serve.Worker`` (each returns a JSON-able dict)."""

    def __init__(self):
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
        """Shut down every engine but those of ``keep`` = [[model, slots], ...] (frees their caches)."""
        keep = {(m, s) for m, s in keep}
        for key in [k for k in self.engines if k not in keep]:
            self.engines.pop(key).shutdown(drain_timeout=5)
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
        """Milliseconds per piece of one decode step of ``width`` tokens (default: every one of ``slots``) on the
        engine with ``slots`` slots (see the module docstring). experts: the expert id of each token in a real
        full step of the run (ignored for a dense model)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from readme_jax.model import moe
        from readme_jax.model.decoder import KVCache, dense_ffn, run_layers
        from readme_jax.sampling import sample_rows

        eng = self.engines[(model, slots)]
        slots = width or slots                               # from here on: the tokens of the timed step
        r = eng.runner
        m = r.model
        cfg = m.config.base if r.is_moe else m.config
        M = next(b for b in r.decode_buckets if b >= slots)
        S, D = r.max_len, cfg.hidden_size
        ctx = int(min(context, S - 2))
        rng = np.random.default_rng(0)
        x = jnp.asarray(0.1 * rng.standard_normal((M, 1, D)), cfg.compute_dtype)
        mask = jnp.ones((M, 1), bool)
        positions = jnp.full((M, 1), ctx, jnp.int32)
        ids = jnp.asarray(rng.integers(100, 1000, (M,)), jnp.int32)
        ex = np.full((M,), -1, np.int32)
        if r.is_moe:
            ex[:slots] = (list(experts) + [0] * slots)[:slots]

        def filled(c: KVCache) -> KVCache:
            """Every row holds ``ctx`` tokens."""
            return c.replace(key_mask=jnp.broadcast_to(jnp.arange(c.max_len) < ctx, c.key_mask.shape),
                             index=jnp.full(c.index.shape, ctx, jnp.int32),
                             next_pos=jnp.full(c.next_pos.shape, ctx, jnp.int32))

        def rewind(c: KVCache) -> KVCache:
            """Back to ``ctx`` tokens after a timed step wrote one more (every call sees the same shapes)."""
            return c.replace(index=c.index - 1, next_pos=c.next_pos - 1)

        zero_ffn = lambda p, h: (jnp.zeros_like(h), None)  # noqa: E731

        @functools.partial(jax.jit, donate_argnums=(2,))
        def attention(layers, x, cache):
            y, cache, _ = run_layers(layers, x, positions=positions, attention_mask_=mask, cfg=cfg, ffn_fn=zero_ffn,
                                     cache=cache)
            return y, rewind(cache)

        @jax.jit
        def ffn(layers, h, ex):
            if r.is_moe:
                kw = {} if r.dispatcher is None else {"dispatcher": r.dispatcher}
                f = moe.moe_ffn_fn(moe.plan_dispatch(ex[:, None], m.config.num_experts, **kw))
            else:
                f = dense_ffn
            for p in layers:
                h = h + f(p, h)[0]
            return h

        @jax.jit
        def head(params, h):
            logits = nnx.merge(r.graphdef, params).tok.decode(h)[:, 0]
            zeros_i, zeros_f = jnp.zeros((M,), jnp.int32), jnp.zeros((M,), jnp.float32)
            return sample_rows(logits, zeros_i, zeros_i + ctx, zeros_f, zeros_f + 1.0)

        @functools.partial(jax.jit, donate_argnums=(2,))
        def route(params, ids, rcache):
            nxt, rcache = nnx.merge(r.graphdef, params).route(ids[:, None], attention_mask=mask, router_cache=rcache)
            return nxt, rewind(rcache)

        caches = {"attention": filled(KVCache.init(cfg, M, S))}
        if r.is_moe:
            caches["router"] = filled(m.router.init_cache(M, S))

        def run_attention():
            y, caches["attention"] = attention(r.layers, x, caches["attention"])
            return y

        def run_router():
            nxt, caches["router"] = route(r.params, ids, caches["router"])
            return nxt

        slot_ids = list(range(slots))
        fns = {"attention": run_attention, "ffn": lambda: ffn(r.layers, x, ex), "head": lambda: head(r.params, x),
               "step": lambda: r.decode(slot_ids, [101] * slots, ex[:slots].tolist(), [0] * slots, [0.0] * slots,
                                        [1.0] * slots)}
        if r.is_moe:
            fns["router"] = run_router
        ms = {k: 1e3 * v for k, v in _median_s(fns, repeats).items()}
        for s in slot_ids:                                  # the timed decode calls wrote into idle slots
            r.free(s)
        ms.setdefault("router", 0.0)
        ms["other"] = ms["step"] - ms["attention"] - ms["ffn"] - ms["head"] - ms["router"]
        ms["host"] = 1e3 * step_wall_s - ms["step"]
        ms["engine_step"] = 1e3 * step_wall_s
        return {"ms": ms, "bucket": M, "context": ctx, "experts": ex[:slots].tolist()}
