"""What the logit processors cost the packed step: ``python -m benchmarks sampling_tail [--quick]``.

The step's tail after the LM head, on SmolLM2's vocabulary (V = 49,152), S sampling rows (half greedy, a
quarter temperature 0.8, a quarter with top-p 0.9), one jitted call each, timed round-robin in one process:
  before     ``sample_rows`` + ``row_logprobs`` (what the step ran before the processors existed)
  neutral    the step's tail now with every field neutral: the token-count scatter (every index dropped), the
             processors behind their ``lax.cond``s, top-k / min-p arrays of zeros, prompt logprobs off
  active     the same with every row using penalties, logit_bias (device rows), top-k 40 and min-p 0.05
Rows: neutral vs before (the issue's bound: the serving step slows <= 3% with every field neutral; the tail is
where all of the new work sits, so its own ratio bounds the step's) and active vs before (what a request
that uses the processors pays). The full SmolLM2 decode step is timed too (not quick), for scale.
"""

from __future__ import annotations

import functools

from benchmarks.common import make_row, median, run_variant, time_calls

V, SEQS = 49152, (8, 32)


def tail_case(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from readme_jax.sampling import sample_rows
    from readme_jax.serve import step_sampling as ss

    out = {}
    for S in SEQS:
        M, N = S, S
        logits = jax.random.normal(jax.random.key(0), (S, V)) * 3
        temps = jnp.asarray(np.resize([0, 0, 0.8, 0.8], S), jnp.float32)
        top_ps = jnp.asarray(np.resize([1, 1, 1, 0.9], S), jnp.float32)
        seeds, pos, toks = jnp.arange(S), jnp.full(S, 100), jnp.asarray(np.arange(N) * 7, jnp.int32)
        want = jnp.zeros(S, bool)

        def proc(active):
            row = np.arange(S, dtype=np.int32) if active else np.full(S, M, np.int32)
            return {k: jnp.asarray(v) for k, v in {
                "top_k": np.full(S, 40 if active else 0, np.int32),
                "min_p": np.full(S, 0.05 if active else 0, np.float32),
                "presence": np.full(S, 0.5 if active else 0, np.float32),
                "frequency": np.full(S, 0.3 if active else 0, np.float32),
                "repetition": np.full(S, 1.2 if active else 1, np.float32), "row": row,
                "token_row": row, "token_out": np.ones(N, bool), "on": np.bool_(active)}.items()}

        @jax.jit
        def before(logits):
            tok = sample_rows(logits, seeds, pos, temps, top_ps)
            return tok, ss.row_logprobs(logits, tok, want)

        @functools.partial(jax.jit, donate_argnums=(1,))
        def now(logits, state, p):
            state = ss.count_tokens(state, toks, p)
            tok = sample_rows(ss.apply_row_processors(logits, state, p), seeds, pos, temps, top_ps, p["top_k"],
                              p["min_p"])
            plp = ss.prompt_logprobs(lambda h: h @ jnp.zeros((1, V)), jnp.zeros((N, 1)), toks, jnp.bool_(False))
            return tok, ss.row_logprobs(logits, tok, want), plp, state

        states = {k: ss.init_row_state(M, V) for k in ("neutral", "active")}
        procs = {"neutral": proc(False), "active": proc(True)}

        def run_now(kind):
            tok, lp, plp, states[kind] = now(logits, states[kind], procs[kind])
            return tok, lp, plp

        t = time_calls({"before": lambda: before(logits), "neutral": lambda: run_now("neutral"),
                        "active": lambda: run_now("active")}, warmup=2, repeats=repeats)
        out[S] = {k: median(v["wall"]) for k, v in t.items()}
    return out


def step_case(repeats: int) -> dict:
    """The SmolLM2-135M decode step of 8 rows at a 128-token context (random weights), for scale."""
    from flax import nnx

    from benchmarks.step_roofline import _batch
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    from readme_jax.serve.paged_runner import PagedRunner

    runner = PagedRunner(Llama(LlamaConfig(), rngs=nnx.Rngs(0)), num_pages=8 * 9 + 2, page_size=16, max_num_seqs=8,
                         max_num_batched_tokens=8, max_model_len=256)
    batch = _batch(8, 1, 129)
    return {"step": median(time_calls({"step": lambda: runner.step(batch).result()}, repeats=repeats)["step"]["wall"])}


def run(quick: bool = False) -> list[dict]:
    repeats = 5 if quick else 30
    t = run_variant("benchmarks.sampling_tail:tail_case", {"repeats": repeats})
    step = None if quick else run_variant("benchmarks.sampling_tail:step_case", {"repeats": 10})["step"]
    rows = []
    for S in SEQS:
        r = t[str(S)]
        scale = f"; SmolLM2 decode step (8 rows) {step * 1e3:.1f} ms" if step else ""
        rows.append(make_row("sampling_tail", f"S={S} every field neutral vs before the processors",
                             r["neutral"] * 1e3, r["before"] * 1e3, "ms", higher_is_better=False, goal=1 / 1.03,
                             note=f"extra {(r['neutral'] - r['before']) * 1e3:+.2f} ms{scale}"))
        rows.append(make_row("sampling_tail", f"S={S} every row with penalties, bias, top-k, min-p vs before",
                             r["active"] * 1e3, r["before"] * 1e3, "ms", higher_is_better=False,
                             note="what a request using the processors pays in the tail"))
    return rows
