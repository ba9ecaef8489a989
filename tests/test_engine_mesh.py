"""The engine on a device mesh (the 8 simulated CPU devices): params sharded, page pools replicated, and the
same greedy tokens as the same engine on one device."""

import time

import chex
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from readme_jax.parallel.mesh import make_mesh
from readme_jax.sampling import SamplingParams
from readme_jax.serve import __main__ as cli
from readme_jax.serve.engine import Engine, EngineConfig
from tests.test_engine import tokens
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="warms up serving engines on a simulated device mesh")

DENSE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=64)
RME = ReadMeConfig(                                     # E = 4: the experts split over "expert" = 2
    base=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=8, max_position_embeddings=64),
    num_experts=4, expert_dim=12,
    router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=4, embed_rank=4, max_len=64))


@pytest.fixture(scope="module")
def models():
    return {"dense": random_model(lambda rngs: Llama(DENSE, rngs=rngs), seed=1, std=0.3),
            "readme": random_model(lambda rngs: ReadMe(RME, rngs=rngs), seed=2, std=0.3,
                                   overrides={"router.embed": 0.6, "router.embed_proj": 0.6, "router.head": 0.6})}


PROMPTS, MAX_TOKENS = (3, 9, 1), (7, 6, 8)


def serve(model, slots: int, mesh=None):
    """Three greedy requests (prompts of 1..9 tokens), submitted staggered. 8 slots: three sequences decode in
    one step (a sequence bucket of 4: one padding row); 2 slots: the third request waits for a freed slot.
    Returns the tokens, the runner and the step log."""
    eng = Engine(model, None, EngineConfig(max_num_seqs=slots, max_num_batched_tokens=16, max_model_len=16,
                                           min_token_bucket=16, page_size=8, mesh=mesh))
    eng.start(warmup=False)                             # compile only the buckets these requests use
    rng = np.random.default_rng(0)
    streams = []
    for i, (n, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        streams.append(eng.submit(rng.integers(0, 40, n).tolist(), SamplingParams(max_tokens=m, ignore_eos=True)))
        time.sleep(0.02 * (i % 2))
    outs = [tokens(s)[0] for s in streams]
    eng.shutdown(5)
    assert eng.healthy
    return outs, eng.runner, eng.step_log


# model, slots, mesh, a param and its spec, the decode widths the run must see
CASES = [pytest.param("dense", 8, {"fsdp": 8}, ("attn", "wq"), P(None, "fsdp", None), {3}, id="dense-1x8x1"),
         pytest.param("readme", 2, {"data": 2, "fsdp": 2, "expert": 2}, ("experts", "w_gate"),
                      P(None, "expert", "fsdp", None), {2}, id="readme-2x2x2")]


@pytest.mark.parametrize("name, slots, sizes, param, param_spec, widths", CASES)
def test_mesh_engine_matches_one_device(models, name, slots, sizes, param, param_spec, widths):
    model = models[name]
    ref, _, _ = serve(model, slots)
    got, runner, log = serve(model, slots, make_mesh(sizes))
    chex.assert_trees_all_equal(got, ref)
    assert [len(t) for t in got] == list(MAX_TOKENS)
    assert widths <= {e["decode_tokens"] for e in log}          # padding next to real rows / every row in place
    weight = runner.params[0][param[0]][param[1]][...]
    assert weight.sharding.spec == param_spec and not weight.sharding.is_fully_replicated
    pools = list(runner.kv) + (list(runner.rkv) if name == "readme" else [])
    assert pools and all(a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8 for a in pools)


def test_mesh_refuses_the_resident_pool(models):
    with pytest.raises(ValueError, match="expert_slots.*mesh"):
        Engine(models["readme"], None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=16,
                                                    expert_slots=2, mesh=make_mesh({"expert": 2})))


def test_cli_mesh_flag(capsys):
    assert cli.parse_args(["--model", "m", "--mesh", "data=1,fsdp=-1,expert=2"]).mesh == {
        "data": 1, "fsdp": -1, "expert": 2}
    assert cli.parse_args(["--model", "m"]).mesh is None
    for bad in ("data=2,fsdp", "data=x", "tensor=2", "data=0", "data=-1,fsdp=-1", "fsdp=2,fsdp=2"):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--model", "m", "--mesh", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--mesh" in err and "NAME=SIZE" in err and repr(bad) in err
    assert cli.main(["--model", "absent", "--mesh", "data=16"]) == 2      # 16 devices of 8: before loading
    assert "--mesh" in capsys.readouterr().err
