"""The serving engine: continuous batching gives each request the tokens it gets alone, compiles once."""

import threading
import time

import numpy as np
import pytest

from readme_jax.generation import generate_ids
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from readme_jax.sampling import SamplingParams
from readme_jax.serve import paged_runner as runner_mod
from readme_jax.errors import QueueFullError
from readme_jax.serve.engine import Engine, EngineConfig
from readme_jax.serve.schedulers import make_scheduler
from readme_jax.serve.simulate import SimConfig, requests_from_log, simulate
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="warms up serving engines (compiles every token and sequence bucket of the packed step)")

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256)
ENGINE_CFG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, max_queue=64,
                          min_token_bucket=16)


@pytest.fixture(scope="module")
def model():
    return random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, None, ENGINE_CFG)
    eng.start()
    yield eng
    eng.shutdown(5)


def tokens(stream) -> tuple[list[int], str]:
    ids, reason = [], None
    for out in stream:
        ids += out.token_ids
        reason = out.finish_reason
    return ids, reason


def compiles() -> int:
    return sum(f._cache_size() for f in (runner_mod._step, runner_mod._route))


def test_no_compiles_after_warmup(engine):
    """First test of the module: the engine has only warmed up. 50 requests of 1..99 prompt tokens (chunked
    past the budget) and 1..11 new tokens compile nothing more."""
    before = compiles()
    rng = np.random.default_rng(1)
    streams = [engine.submit(rng.integers(0, 64, int(n)).tolist(), SamplingParams(max_tokens=int(m), ignore_eos=True))
               for n, m in zip(rng.integers(1, 100, 50), rng.integers(1, 12, 50))]
    for s in streams:
        tokens(s)
    assert compiles() == before


def test_staggered_requests_get_the_tokens_they_get_alone(engine, model):
    """Prompts of 1..70 tokens (70 > the 32-token budget: chunked prefill) arriving while others decode."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, n).tolist() for n in (3, 40, 7, 12, 70, 1, 25)]
    streams = []
    for i, p in enumerate(prompts):
        streams.append(engine.submit(p, SamplingParams(max_tokens=6 + i, ignore_eos=True)))
        time.sleep(0.02 * (i % 3))
    for i, (p, s) in enumerate(zip(prompts, streams)):
        got, reason = tokens(s)
        assert got == generate_ids(model, [p], 6 + i)[0], f"prompt of {len(p)} tokens"
        assert reason == "length"


def test_seeded_request_ignores_its_neighbours(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=11, ignore_eos=True)
    alone = tokens(engine.submit([5, 6, 7], params))[0]
    others = [engine.submit([9] * n, SamplingParams(temperature=0.7, max_tokens=8, seed=n, ignore_eos=True))
              for n in (2, 5, 9)]
    crowded = engine.submit([5, 6, 7], params)
    assert tokens(crowded)[0] == alone
    assert len({tuple(tokens(s)[0]) for s in others}) == 3
    greedy = tokens(engine.submit([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True)))[0]
    assert alone != greedy                                # the seed, not the argmax, picked these


def test_stop_tokens_cancel_and_finish_reasons(engine, model):
    ref = generate_ids(model, [[4, 4, 2]], 8)[0]
    got, reason = tokens(engine.submit([4, 4, 2], SamplingParams(max_tokens=8, stop_token_ids=(ref[3],))))
    assert got == ref[: ref.index(ref[3]) + 1] and reason == "stop"
    stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    first = next(iter(stream))
    stream.cancel()
    rest = list(stream)
    assert first.token_ids and rest[-1].finish_reason == "abort"
    deadline = time.monotonic() + 30
    while engine.stats()["active_slots"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active_slots"] == 0


def test_bounded_queue_and_bad_lengths(model):
    """Only requests beyond the free slots count against max_queue (2 slots + 1 queued here)."""
    eng = Engine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64,
                                           max_queue=1))
    eng.ready = True                                      # accept submissions; the thread is never started
    for _ in range(3):
        eng.submit([1, 2], SamplingParams(max_tokens=4))
    assert eng.stats()["queue_depth"] == 3
    with pytest.raises(ValueError, match="priority"):
        eng.submit([1, 2], SamplingParams(max_tokens=4), priority=2**40)
    with pytest.raises(QueueFullError):
        eng.submit([1, 2], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.submit([1] * 60, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        eng.submit([], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        eng.submit([64], SamplingParams(max_tokens=8))


def test_engine_failure_reaches_every_request(model):
    fail = threading.Event()

    def hook(step):
        if fail.is_set():
            raise RuntimeError("injected")

    eng = Engine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64),
                 fault_hook=hook)
    eng.start(warmup=False)
    s = eng.submit([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
    next(iter(s))
    fail.set()
    last = list(s)[-1]
    assert last.finish_reason == "error" and "injected" in last.error
    assert not eng.healthy


RCFG = ReadMeConfig(
    base=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                     num_kv_heads=1, head_dim=8, max_position_embeddings=128),
    num_experts=3, expert_dim=12,
    router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=3, embed_rank=4, max_len=128))


def test_readme_engine_routes_ahead_and_matches_generate():
    """Read-ME, expert-aware batching: the router runs on each prompt at arrival and on each sampled token
    right after sampling; the backbone gets those ids. Tokens equal ``generate`` alone; the experts the engine
    ran for each decode token equal routing the whole sequence at once; idle slots count as no expert. The
    engine's step log replayed through the simulator (same scheduler, slots, budget) reproduces every pick."""
    import jax.numpy as jnp

    model = random_model(lambda rngs: ReadMe(RCFG, rngs=rngs), seed=2, std=0.3,
                         overrides={"router.embed": 0.6, "router.embed_proj": 0.6, "router.head": 0.6})
    cfg = EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, max_model_len=64, min_token_bucket=16,
                       scheduler="expert-aware", scheduler_options=(("max_wait", 1),))
    eng = Engine(model, None, cfg)
    eng.start()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 40, n).tolist() for n in (5, 20, 2, 9, 17, 3)]
    streams = [eng.submit(p, SamplingParams(max_tokens=7, ignore_eos=True)) for p in prompts[:3]]
    first = next(iter(streams[0])).token_ids              # the rest arrive while these decode
    streams += [eng.submit(p, SamplingParams(max_tokens=7, ignore_eos=True)) for p in prompts[3:]]
    outs = [([] if i else first) + tokens(s)[0] for i, s in enumerate(streams)]
    log = list(eng.step_log)
    eng.shutdown(5)
    sim = simulate(requests_from_log(log), make_scheduler("expert-aware", max_wait=1),
                   SimConfig(slots=3, budget=16, record_picks=True))
    assert [(tuple(map(tuple, e["prefills"])), tuple(e["decodes"])) for e in log] == \
        [(p.prefills, p.decodes) for p in sim.picks]
    assert any(len(e["decodes"]) and e["prefills"] for e in log)      # decodes and chunks shared steps
    for p, got in zip(prompts, outs):
        assert got == generate_ids(model, [p], 7)[0]
    for rid, p, got in zip([st.request_id for st in streams], prompts, outs):
        full = np.asarray(model.route(jnp.asarray([p + got], jnp.int32)))[0]
        ran = [e for entry in log for r, e in zip(entry["decode_requests"], entry["decode_experts"]) if r == rid]
        assert ran == full[len(p): len(p) + len(got) - 1].tolist()     # each decode token's expert, ahead
    for entry in log:
        if entry["decode_tokens"]:
            assert entry["distinct_experts"] == len(set(entry["decode_experts"])) <= 3
