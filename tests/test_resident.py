"""The resident expert pool in the engine: steps compute on k resident slots, tokens are unchanged."""

import jax
import numpy as np
import pytest

from readme_jax.sampling import SamplingParams
from readme_jax.serve import paged_runner as runner_mod
from readme_jax.serve.engine import Engine, EngineConfig
from readme_jax.serve.resident import ResidentPool
from tests.test_engine import tokens
from tests.tiny_models import TINY_READ_ME, random_model

from readme_jax.model.readme import ReadMe


@pytest.fixture(scope="module")
def model(tiny_readme):
    return tiny_readme


def run(model, expert_slots, prompts, policy="belady"):
    eng = Engine(model, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, max_model_len=64,
                                           expert_slots=expert_slots, expert_policy=policy))
    eng.start(warmup=False)                   # compiles only the shapes these prompts use
    streams = [eng.submit(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
    outs = [tokens(s)[0] for s in streams]
    eng.shutdown(5)
    return outs, eng


@pytest.mark.slow(reason="runs four engines (no cache, three cache settings)")
def test_cache_leaves_tokens_unchanged_and_moves_experts(model):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 40, n).tolist() for n in (6, 3, 11, 2, 8)]
    full, _ = run(model, None, prompts)
    for k, policy in ((3, "belady"), (2, "belady"), (2, "lru")):
        got, eng = run(model, k, prompts, policy)
        assert got == full, (k, policy)
        stats = eng.cache.stats
        assert stats.misses == eng.runner.pool.loads * TINY_READ_ME.base.num_layers   # every miss was a real move
        assert len(eng.runner.pool.slot_of) <= k
        if k < 3:
            assert stats.misses > 0 and stats.hits > 0


@pytest.mark.slow(reason="warms up a Read-ME engine on the resident pool (11 s here)")
def test_step_reads_only_the_pool(monkeypatch):
    """The compiled packed step with a resident pool takes no argument holding all experts and makes no
    temporary of them (experts wide enough here to dominate every other buffer of the step)."""
    import dataclasses
    model = random_model(lambda rngs: ReadMe(dataclasses.replace(TINY_READ_ME, expert_dim=256), rngs=rngs), seed=2)
    pool = ResidentPool(model.experts.arrays(), 1)
    all_experts = sum(a.size * a.dtype.itemsize for a in model.experts.arrays().values())
    eng = Engine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64,
                                           expert_slots=1))
    r = eng.runner
    seen = {}
    real = runner_mod._step

    def spy(*args, **kwargs):                      # the arguments of a real step, as the runner passes them
        seen["args"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array)
                                    else x, (args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(runner_mod, "_step", spy)
    r.pool.sync({0})
    r._warm_step(r.token_buckets[0], 1, r.dispatcher(r.token_buckets[0]))
    args, kwargs = seen["args"]
    compiled = real.lower(*args, **kwargs).compile()
    leaves = jax.tree.leaves((r.params, r.layers(None), r.pool.fast))
    assert max(x.size * x.dtype.itemsize for x in leaves) < all_experts
    stub, rest = r.params                          # the experts' variables travel as zero-size stand-ins
    assert all(x.size == 0 for x in jax.tree.leaves(stub)) and len(jax.tree.leaves(stub)) == 3
    assert not any("experts" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(rest))
    chex_shapes = {k: v.shape for k, v in r.pool.fast.items()}
    L, E, D, Fe = model.experts.w_gate[...].shape
    assert chex_shapes == {"w_gate": (L, 1, D, Fe), "w_up": (L, 1, D, Fe), "w_down": (L, 1, Fe, D)}
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < all_experts
    assert pool.expert_bytes * E == all_experts
