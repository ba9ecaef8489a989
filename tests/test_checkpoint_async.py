"""Checkpoint writes in the background (train.async_checkpoint) and the save cadence (train.checkpoint_every /
train.checkpoint_seconds): a save returns before its files are final, the saved values are the ones given even
when the next step reuses their buffers, a process killed mid-write leaves the previous step the latest and
restorable, and the cadence fires by steps, by time, or both."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.train.checkpointing import Cadence, PhaseCheckpoints


def test_async_save_keeps_the_values_given_while_the_next_step_donates_them(tmp_path):
    ck = PhaseCheckpoints(tmp_path / "expert_0", async_write=True)
    params = {"w": jnp.arange(1_000_000, dtype=jnp.float32)}
    ck.save(1, params, {"m": jnp.ones(3)}, {"done": False})
    step = jax.jit(lambda p: {"w": p["w"] * 0.0 - 1.0}, donate_argnums=0)
    jax.block_until_ready(step(params))                 # a train step donating the saved state
    ck.wait()
    got, opt, meta = PhaseCheckpoints(tmp_path / "expert_0").restore({"w": jnp.zeros(1_000_000)}, {"m": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(1_000_000, dtype=np.float32))
    assert meta["step"] == 1 and not meta["done"]


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint_the_latest(tmp_path):
    """Step 2 is written (and waited for); step 4's asynchronous write of ~400 MB is cut by os._exit right after
    save returns: step 4 never appears as a step, and step 2 restores."""
    script = textwrap.dedent(f"""
        import os, jax.numpy as jnp
        from readme_jax.train.checkpointing import PhaseCheckpoints
        ck = PhaseCheckpoints({str(tmp_path / "expert_0")!r}, async_write=True)
        ck.save(2, {{"w": jnp.full((4,), 2.0)}}, {{"m": jnp.zeros(1)}}, {{"done": False}})
        ck.wait()
        big = {{"w": jnp.ones((100_000_000,), jnp.float32)}}
        ck.save(4, big, {{"m": jnp.zeros(1)}}, {{"done": True}})
        os._exit(3)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    ck = PhaseCheckpoints(tmp_path / "expert_0")
    assert ck.latest_step() == 2
    got, _, meta = ck.restore({"w": jnp.zeros(4)}, {"m": jnp.zeros(1)})
    np.testing.assert_array_equal(np.asarray(got["w"]), 2.0)
    assert not meta["done"]


def test_cadence_by_steps_by_time_or_both():
    now = [0.0]
    clock = lambda: now[0]
    steps = Cadence(3, None, clock)
    assert [s for s in range(1, 10) if steps.due(s)] == [3, 6, 9]
    timed = Cadence(None, 10.0, clock)
    due = []
    for s in range(1, 8):
        now[0] += 4.0                                     # 4 s per step: due once 10 s passed since the last save
        if timed.due(s):
            due.append(s)
            timed.saved()
    assert due == [3, 6]
    both = Cadence(5, 10.0, clock)
    assert both.due(5)
    now[0] += 11.0
    assert both.due(1)
    assert not Cadence(None, None, clock).due(100)        # only the end-of-phase save
