"""Router pool size (``ablate_pool``): does the router need more distinct sequences than the default pool?

The default router round draws 100 x 16 sequences from a pool of 16 per domain (80 distinct: ~20 epochs a round).
For each size of ``ablate_pool.router_pool_seqs`` a variant run (forked from the parent: corpus, statistics
and masks reused) computes that pool's targets (stage 'targets') and trains router_0 exactly as the parent
did (same steps, batch, lr, seed); the table compares held-out router accuracy, locality and the untuned MoE's
perplexity with the parent's router_0.

    python -m readme_jax.science ablate_pool --run-dir runs/default
"""

from __future__ import annotations

import dataclasses

import json

from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.fork import fork_run
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.science.variants import variant_config
from readme_jax.train.run import Run, say


def _router_0(parent: Run, child_dir, n: int, progress: bool) -> dict:
    from readme_jax.train.pipeline import run_pipeline
    from readme_jax.train.stages import moe_metrics
    from readme_jax.train.trainer import phases
    cfg = variant_config(parent, [f"train.router_pool_seqs={n}"])
    fork_run(parent.dir, child_dir, cfg)
    run_pipeline(cfg, child_dir, stage="targets", progress=progress)
    run = Run(cfg, child_dir, progress=progress)
    model = run.fresh_model()
    phase = phases(cfg)[0]
    trainer = run.trainer(model, run.router_pool)
    if trainer.is_done(phase):
        trainer.load_done(phase)
    else:
        trainer.run(phase)
    return moe_metrics(run, model)


@dataclasses.dataclass(frozen=True)
class AblatePoolSettings:
    router_pool_seqs: tuple[int, ...] = (48,)  # besides the parent's own; router_0 only (router accuracy)


@EXPERIMENTS.register("ablate_pool", AblatePoolSettings)
def ablate_pool(parent, settings, *, progress: bool = True) -> dict:
    domains = list(parent.corpus.domains)
    sizes = [int(n) for n in settings.router_pool_seqs]
    with Experiment(parent, "ablate_pool", {"router_pool_seqs": sizes}) as ex:
        rows = {parent.cfg.train.router_pool_seqs: json.loads(parent.eval_path("router_0").read_text())}
        for n in sizes:
            say(f"[ablate_pool] pool of {n} sequences per domain")
            rows[n] = ex.part(f"pool{n}", lambda n=n: _router_0(parent, ex.path("runs", f"pool{n}"), n, progress))
        t = parent.cfg.train
        body = [[f"{n} x {len(domains)}{' (parent)' if n == t.router_pool_seqs else ''}",
                 f"{t.router_steps * t.router_batch / (n * len(domains)):.1f}", r["router_accuracy"], r["locality"],
                 *[r["ppl"][d]["ppl"] for d in domains]] for n, r in rows.items()]
        table = markdown_table(["pool (sequences)", "epochs in router_0", "router accuracy", "locality",
                                *[f"{d} ppl (router_0)" for d in domains]], body)
        result = {"rows": {str(k): v for k, v in rows.items()}}
        ex.finish(result, table)
        return result
