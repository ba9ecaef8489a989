"""One process of the multi-host test (tests/test_multihost.py): trains the first router and expert phases
of a copied tiny run on a (data, fsdp, expert) mesh spanning every process, then writes the final params.

    python tests/multihost_worker.py RUN_DIR OUT.npz key.sub=value ...

The process count, id and coordinator come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(readme_jax.parallel.distributed); XLA_FLAGS gives each process its simulated CPU devices. The run folder
must hold a finished tiny run's inputs (dense model, masks, router targets, corpus) without checkpoints.
Process 0 writes OUT.npz: every param of the model after the two phases, gathered from all processes (those
no phase trained are each process's own full copy).
"""

import sys

import numpy as np

from readme_jax.parallel.distributed import initialize


def main(run_dir: str, out: str, overrides: list[str]) -> None:
    initialize()
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from readme_jax.config import load_config
    from readme_jax.train.run import Run
    from readme_jax.train.trainer import phases

    cfg = load_config("tiny", overrides)
    run = Run(cfg, run_dir, progress=False)
    model = run.fresh_model()
    trainer = run.trainer(model, run.router_pool)
    for phase in phases(cfg)[:2]:
        trainer.run(phase)
    state = nnx.state(model, nnx.Param)
    # trained params are global arrays over the mesh; params no phase trained (the frozen embedding) are still
    # the process's own full copy, which an allgather would stack once per process
    flat = {jax.tree_util.keystr(p): np.asarray(x if x.is_fully_addressable else
                                                multihost_utils.process_allgather(x, tiled=True))
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    if jax.process_index() == 0:
        np.savez(out, **flat)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
