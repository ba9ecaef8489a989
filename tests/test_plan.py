"""``python -m readme_jax.train --plan``: the tiny config's memory plan on a (data, fsdp, expert) mesh of the
8 simulated CPU devices through the CLI function (analytic and compiled argument bytes agree, the JSON has
its fields), the collective count of a loop, and bad meshes exit 2 naming the keys."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from readme_jax.train import plan
from readme_jax.train.__main__ import main

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]
BATCHES = ["train.expert_batch=16", "train.router_batch=16"]     # 16 / grad_accum 2 = 8 rows: one per device


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """--plan sets XLA_FLAGS / JAX_PLATFORMS for the devices it wants (too late to change this process's 8);
    give them back afterwards, for the tests that start subprocesses."""
    for key in ("XLA_FLAGS", "JAX_PLATFORMS"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)


@pytest.mark.slow(reason="compiles the tiny run's train steps for the memory plan")
def test_tiny_plan_through_the_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", "tiny", "--plan", "--plan-out", str(out), *MESH, *BATCHES]) == 0
    printed = capsys.readouterr().out
    assert "router step" in printed and "expert step" in printed and "estimate for GPU/TPU" in printed
    d = json.loads(out.read_text())
    assert d["mesh"] == {"data": 2, "fsdp": 2, "expert": 2} and d["devices"] == 8 and d["grad_accum"] == 2
    assert d["readme"]["num_experts"] == 3 and d["readme"]["expert_dim"] == 32      # 0.5 x F = 64
    for kind in ("router", "expert"):
        s = d["steps"][kind]
        a, c = s["analytic"], s["compiled"]
        assert set(a) == {"params", "trainable_params", "frozen_params", "frozen_params_read", "gradients",
                          "optimizer_state", "batch", "arguments"}
        assert set(c) == {"arguments", "outputs", "aliased", "temporaries", "generated_code", "total", "activations"}
        assert abs(a["arguments"] - c["arguments"]) <= 0.01 * c["arguments"] and s["argument_check"]
        assert a["params"] == a["trainable_params"] + a["frozen_params"] and a["gradients"] == a["trainable_params"]
        assert c["aliased"] > 0.9 * (a["trainable_params"] + a["optimizer_state"])     # donated state reused
        assert c["total"] >= c["arguments"] + a["frozen_params"] - a["frozen_params_read"] and s["fits"]
        # the expert step reads the frozen tied embedding (the tiny config keeps the default freeze_embedding)
        assert (a["frozen_params_read"] > 0) == (kind == "expert")
        assert s["collectives"]["total_bytes"] > 0 and s["rows_per_micro_batch"] == 8
    expert = d["steps"]["expert"]
    assert expert["capacity"] == 64                       # 8 rows x 64 tokens / 8 devices: every token to one
    assert expert["collectives"]["bytes"]["all-to-all"] > 0


def test_collectives_in_a_loop_count_its_trips():
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])

    def f(v):
        def body(c, _):
            return c + jax.lax.psum(c, "x"), None
        return jax.lax.scan(body, v, None, length=3)[0]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    hlo = g.lower(x).compile().as_text()
    got = plan.collective_bytes(hlo)
    assert got["ops_run"]["all-reduce"] == 3 and got["bytes"]["all-reduce"] == 3 * 8 * 4     # f32[8] per device
    assert np.isclose(got["total_bytes"], 96)


@pytest.mark.parametrize("overrides, names", [
    (["mesh.fsdp=16"], ["mesh", "16 devices"]),                                  # more than the 8 devices
    (["mesh.model=2"], ["mesh.model"]),                                          # no such axis
    (MESH, ["train.router_batch", "train.grad_accum", "mesh"]),                  # 4 / 2 rows on 8 devices
])
def test_bad_mesh_exits_2(overrides, names, capsys):
    assert main(["--config", "tiny", "--plan", *overrides]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in names), err


def test_architecture_from_config_json_else_model_architecture(tmp_path):
    from readme_jax.config import load_config
    from readme_jax.errors import ConfigError
    from readme_jax.model.config import LlamaConfig
    dense = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(dense.to_hf()))
    rcfg, where = plan.readme_config(load_config("tiny", [f"model.source={tmp_path}"]))
    assert where.endswith("config.json") and rcfg.base.intermediate_size == 40 and rcfg.base.vocab_size == 64
    assert rcfg.expert_dim == 20 and rcfg.num_experts == 3 and rcfg.router.vocab_size == 64
    assert rcfg.base.param_dtype == "float32"                                    # f32 master weights
    rcfg, where = plan.readme_config(load_config("llama2_7b_readme"))            # no weights here
    assert where == "model.architecture" and rcfg.expert_dim == 5504 and rcfg.num_experts == 7
    with pytest.raises(ConfigError, match="model.architecture"):
        plan.readme_config(load_config(None))                                    # smollm2: no config.json
