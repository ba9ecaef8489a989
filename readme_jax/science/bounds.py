"""Routing bounds on the tuned MoE: held-out perplexity under four routings of the same windows.

* router: the pre-gating router's choice (what Read-ME serves);
* targets: the dense parent's own routing (top-1 of its layer-summed distillation targets), the router's ceiling;
* oracle domain: every token of a domain sent to that domain's expert;
* random: a uniformly random expert per token (seeded).

Same windows as the run's evaluations (eval.seq_len x eval.max_tokens per domain); the table also gives each
routing's agreement with the targets and its locality (same expert as the previous token).

    python -m readme_jax.science bounds --run-dir runs/default
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from readme_jax.nnx_jit import jit_method
from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import grouped_bars
from readme_jax.science.redundancy import locality
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train import targets as targets_lib
from readme_jax.train.run import say

ROUTINGS = ("router", "targets", "oracle domain", "random")


def routed_nll_fn(model):
    """``(ids, targets, expert_ids) -> summed NLL`` of a ReadMe (all int32[B, T]), jitted once."""
    nll = jit_method(model, lambda m, ids, tg, eids: jnp.sum(m.token_nll(ids, tg, expert_ids=eids)))
    return lambda ids, tg, eids: float(nll(jnp.asarray(ids), jnp.asarray(tg), jnp.asarray(eids)))


def oracle_ppl(model, windows: dict, batch: int) -> dict[str, float]:
    """Held-out perplexity per domain of a ReadMe with every token sent to its own domain's expert (the i-th
    domain of ``windows`` {domain: (inputs, targets) int32[W, T]} to expert i), ``batch`` windows per call."""
    nll = routed_nll_fn(model)
    ppl = {}
    for i, (d, (inputs, targets)) in enumerate(windows.items()):
        e = np.full(inputs.shape, i, np.int32)
        total = sum(nll(inputs[j:j + batch], targets[j:j + batch], e[j:j + batch])
                    for j in range(0, len(inputs), batch))
        ppl[d] = float(np.exp(total / targets.size))
    return ppl


@dataclasses.dataclass(frozen=True)
class BoundsSettings:
    seed: int = 0                        # random routing's seed


@EXPERIMENTS.register("bounds", BoundsSettings)
def bounds(parent, settings, *, progress: bool = True) -> dict:
    from readme_jax.eval.perplexity import heldout_windows
    from readme_jax.eval.routing import route_windows
    run = parent
    ev, E = run.cfg.eval, run.masks.num_experts
    domains = list(run.corpus.domains)
    with Experiment(run, "bounds", {"seed": settings.seed, "windows": [ev.seq_len, ev.max_tokens]}) as ex:
        windows = {d: heldout_windows(run.corpus, d, run.tokenizer, seq_len=ev.seq_len, max_tokens=ev.max_tokens)
                   for d in domains}
        model = run.trained_model()
        tgt = targets_lib.heldout_routing(ex.path("targets.npz"), {d: w[0] for d, w in windows.items()}, run.dense,
                                          run.masks.specific, batch=ev.batch, use_abs=run.cfg.train.target_abs)
        rng = np.random.default_rng(settings.seed)
        ids = {"router": {d: route_windows(model.router, w[0], batch=ev.batch) for d, w in windows.items()},
               "targets": {d: tgt[d][1] for d in domains},
               "oracle domain": {d: np.full(w[0].shape, i, np.int32) for i, (d, w) in enumerate(windows.items())},
               "random": {d: rng.integers(0, E, w[0].shape, dtype=np.int32) for d, w in windows.items()}}
        nll = routed_nll_fn(model)

        def measure(name):
            out = {}
            for d, (inputs, targets) in windows.items():
                e = ids[name][d]
                total = sum(nll(inputs[i:i + ev.batch], targets[i:i + ev.batch], e[i:i + ev.batch])
                            for i in range(0, len(inputs), ev.batch))
                out[d] = {"ppl": float(np.exp(total / targets.size)), "tokens": int(targets.size),
                          "agreement_with_targets": float((e == ids["targets"][d]).mean()),
                          "locality": locality(e)}
            return out
        res = {}
        for name in ROUTINGS:
            say(f"[bounds] {name}")
            res[name] = ex.part(name.replace(" ", "_"), lambda name=name: measure(name))
        rows = [[name, *[res[name][d]["ppl"] for d in domains],
                 float(np.mean([res[name][d]["agreement_with_targets"] for d in domains])),
                 float(np.mean([res[name][d]["locality"] for d in domains]))] for name in ROUTINGS]
        table = markdown_table(["routing", *domains, "agreement with targets", "locality"], rows)
        table += (f"\n\nThe tuned MoE of {run.dir.name}, {ev.max_tokens:,} held-out tokens per domain in windows of "
                  f"{ev.seq_len}; random routing seed {settings.seed}.")
        grouped_bars({n: {d: res[n][d]["ppl"] for d in domains} for n in ROUTINGS}, ex.path("ppl.png"),
                     title="held-out perplexity by routing (tuned MoE)", ylabel="perplexity", log=True)
        result = {"routings": res}
        ex.finish(result, table)
        return result
