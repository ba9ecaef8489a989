"""The serving engine: continuous batching gives each request the tokens it gets alone, compiles once."""

import threading
import time

import numpy as np
import pytest

from readme_jax.errors import QueueFullError
from readme_jax.generation import generate_ids
from readme_jax.sampling import SamplingParams
from readme_jax.serve import runner as runner_mod
from readme_jax.serve.engine import Engine, EngineConfig

ENGINE_CFG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, max_queue=64,
                          min_prefill_bucket=16)


@pytest.fixture(scope="module")
def model(tiny_dense):
    return tiny_dense


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
    return sum(f._cache_size() for f in (runner_mod._prefill_step, runner_mod._decode_step, runner_mod._route_step))


@pytest.mark.slow(reason="warms up a serving engine (compiles every prefill and decode bucket)")
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


@pytest.mark.slow(reason="warms up a serving engine (compiles every prefill and decode bucket)")
def test_staggered_requests_get_the_tokens_they_get_alone(engine, model):
    """Prompts of 1..70 tokens (70 > the 32-token budget: chunked prefill) arriving while others decode."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, n).tolist() for n in (3, 40, 7, 12, 70, 1, 25)]
    streams = []
    for i, p in enumerate(prompts):
        streams.append(engine.submit(p, SamplingParams(max_tokens=6 + i, ignore_eos=True)))
        time.sleep(0.02 * (i % 3))
    alone = generate_ids(model, prompts, 6 + len(prompts))                 # one compile: each alone in its row
    for i, (p, s) in enumerate(zip(prompts, streams)):
        got, reason = tokens(s)
        assert got == alone[i][:6 + i], f"prompt of {len(p)} tokens"
        assert reason == "length"


@pytest.mark.slow(reason="warms up a serving engine (compiles every prefill and decode bucket)")
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


@pytest.mark.slow(reason="warms up a serving engine (compiles every prefill and decode bucket)")
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
    eng = Engine(model, None, EngineConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64,
                                           max_queue=1))
    eng.ready = True                                      # accept submissions; the thread is never started
    eng.submit([1, 2], SamplingParams(max_tokens=4))
    assert eng.stats()["queue_depth"] == 1
    with pytest.raises(QueueFullError):
        eng.submit([1, 2], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.submit([1] * 60, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        eng.submit([], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        eng.submit([64], SamplingParams(max_tokens=8))


@pytest.mark.slow(reason="runs an engine until an injected failure")
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


@pytest.mark.slow(reason="warms up a serving engine (compiles every prefill and decode bucket)")
def test_readme_engine_routes_ahead_and_matches_generate(tiny_readme):
    """Read-ME: the router runs on each prompt at arrival and on each sampled token right after sampling;
    the backbone gets those ids. Tokens equal ``generate`` alone; the experts the engine ran for each decode
    token equal routing the whole sequence at once; idle slots count as no expert."""
    import jax.numpy as jnp

    model = tiny_readme
    eng = Engine(model, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, max_model_len=64,
                                           min_prefill_bucket=16))
    eng.start()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 40, n).tolist() for n in (5, 20, 2, 9)]
    streams = [eng.submit(p, SamplingParams(max_tokens=7, ignore_eos=True)) for p in prompts]
    outs = [tokens(s)[0] for s in streams]
    log = list(eng.step_log)
    eng.shutdown(5)
    for p, got in zip(prompts, outs):
        assert got == generate_ids(model, [p], 7)[0]
    for rid, p, got in zip([st.request_id for st in streams], prompts, outs):
        full = np.asarray(model.route(jnp.asarray([p + got], jnp.int32)))[0]
        ran = [e for entry in log for r, e in zip(entry["decode_requests"], entry["decode_experts"]) if r == rid]
        assert ran == full[len(p): len(p) + len(got) - 1].tolist()     # each decode token's expert, ahead
    for entry in log:
        if entry["decode_tokens"]:
            assert entry["distinct_experts"] == len(set(entry["decode_experts"])) <= 3
