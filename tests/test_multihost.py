"""Multi-host training with real processes: two CPU processes on 127.0.0.1 (4 simulated devices each, gloo
collectives) train three router and three expert steps of the tiny config on one (data, fsdp, expert) =
(2, 2, 2) mesh spanning both, checkpoint with orbax, and agree with a one-process, one-device run; the
checkpoint saved on (2, 2, 2) restores onto (1, 1, 8) and onto one device with equal params."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
from flax import nnx

from tests.tiny_run import REPO, cli_env

STEPS = ["train.router_steps=3", "train.expert_steps=3", "train.router_batch=16", "train.expert_batch=16",
         "train.checkpoint_every=3", "train.async_checkpoint=true"]      # both processes write in the background
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]
WORKER = str(REPO / "tests" / "multihost_worker.py")


def _inputs_of(run_dir: Path, dst: Path) -> Path:
    """A copy of a finished tiny run's inputs (no checkpoints, evaluations, export or log)."""
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("checkpoints", "eval", "export", "metrics.jsonl",
                                                                 "stages.json", ".lock", "plots"))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir, out, overrides, *, devices, coordinator=None, n=1, pid=0):
    env = cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if coordinator:
        env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(pid))
    return subprocess.Popen([sys.executable, WORKER, str(run_dir), str(out), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["phase"], r["step"], r["loss"]) for r in recs if r.get("event") == "step"]


def test_two_processes_train_save_restore_like_one(tiny_run, tmp_path):
    src, _ = tiny_run
    mesh_dir, one_dir = _inputs_of(src, tmp_path / "mesh"), _inputs_of(src, tmp_path / "one")
    addr = f"127.0.0.1:{_free_port()}"
    procs = [_start(mesh_dir, tmp_path / "mesh.npz", STEPS + MESH, devices=4, coordinator=addr, n=2, pid=i)
             for i in range(2)]
    procs.append(_start(one_dir, tmp_path / "one.npz", STEPS, devices=1))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]

    mesh_params, one_params = np.load(tmp_path / "mesh.npz"), np.load(tmp_path / "one.npz")
    assert sorted(mesh_params) == sorted(one_params)
    # 3 Adam steps per phase; float-order differences of near-zero gradient entries move a param by <~1e-5
    chex.assert_trees_all_close(dict(mesh_params), dict(one_params), rtol=0, atol=1e-4)
    lm, lo = _losses(mesh_dir), _losses(one_dir)
    assert [x[:2] for x in lm] == [x[:2] for x in lo] and len(lm) == 6
    np.testing.assert_allclose([x[2] for x in lm], [x[2] for x in lo], rtol=1e-5)

    # the expert phase's checkpoint (saved by both processes on (2, 2, 2)) onto other meshes
    from readme_jax.config import load_config
    from readme_jax.parallel.mesh import make_mesh
    from readme_jax.parallel.sharding import param_shardings, place
    from readme_jax.train import steps
    from readme_jax.train.checkpointing import PhaseCheckpoints
    from readme_jax.train.run import Run
    run = Run(load_config("tiny", STEPS), mesh_dir, progress=False)
    model = run.fresh_model()
    _, trainable, _ = steps.split_for(model, "expert", freeze_embedding=run.cfg.train.freeze_embedding)
    ck = PhaseCheckpoints(mesh_dir / "checkpoints" / "expert_0")
    for target in (make_mesh({"expert": 8}), None):
        template = trainable if target is None else place(trainable, param_shardings(trainable, target))
        restored, _, meta = ck.restore(template)
        assert meta["done"] and meta["step"] == 3
        if target is not None:
            chex.assert_equal(jax.tree.map(lambda x: x.sharding, restored),
                              jax.tree.map(lambda x: x.sharding, template))
        nnx.update(model, restored)
        got = {jax.tree_util.keystr(p): np.asarray(x)
               for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
        for k, v in got.items():
            if "router" not in k:
                np.testing.assert_array_equal(v, mesh_params[k], err_msg=k)
