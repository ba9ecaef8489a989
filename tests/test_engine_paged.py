"""The engine's paged KV: prefix caching and preemption leave every request's tokens as ``generate`` alone gives
them, dense and Read-ME; no page leaks."""

import dataclasses

import numpy as np
import pytest

from readme_jax.errors import ConfigError
from readme_jax.generation import generate_ids
from readme_jax.model.llama import Llama
from readme_jax.model.readme import ReadMe
from readme_jax.sampling import SamplingParams
from readme_jax.serve.engine import Engine, EngineConfig
from readme_jax.serve.engine_config import parse_kv_memory
from tests.test_engine import CFG, ENGINE_CFG, RCFG, tokens
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="warms up serving engines (compiles every token and sequence bucket of the packed step)")


def run(model, cfg: EngineConfig, prompts, max_tokens: int):
    """The first prompt alone until its first token (its pages are cached), then the rest together."""
    eng = Engine(model, None, cfg)
    eng.start(warmup=False)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    first = eng.submit(prompts[0], params)
    head = next(iter(first)).token_ids
    streams = [eng.submit(p, params) for p in prompts[1:]]
    outs = [head + tokens(first)[0]] + [tokens(s)[0] for s in streams]
    eng.shutdown(5)
    assert eng.healthy
    eng.pages.check()                                     # no leak: every page free, cached ones unreferenced
    assert not eng.pages.tables and eng.pages.num_free == eng.pages.num_pages - 1
    return outs, eng


CASES = [  # model, engine settings, shared prefix (2 full pages), tail, max_tokens
    pytest.param(lambda: random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3),
                 dataclasses.replace(ENGINE_CFG, kv_cache_memory="12pages"), 32, 8, 40, id="dense"),
    pytest.param(lambda: random_model(lambda rngs: ReadMe(RCFG, rngs=rngs), seed=2, std=0.3,
                                      overrides={"router.embed": 0.6, "router.embed_proj": 0.6, "router.head": 0.6}),
                 EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, min_token_bucket=8,
                              page_size=8, kv_cache_memory="12pages", scheduler="expert-aware"), 16, 4, 20,
                 id="readme"),
]


@pytest.mark.parametrize("make, cfg, shared, tail, max_tokens", CASES)
def test_prefix_cache_and_preemption_keep_tokens(make, cfg, shared, tail, max_tokens):
    """Four requests sharing two full pages, more pages than the pool holds: with prefix caching on and off
    the tokens equal ``generate`` alone; sequences were preempted (and recomputed) in both runs; with caching
    on the three later requests hit at least the shared pages, off nothing; several prompts shared a step."""
    model = make()
    rng = np.random.default_rng(5)
    prefix = rng.integers(0, 40, shared).tolist()
    prompts = [prefix + rng.integers(0, 40, tail).tolist() for _ in range(4)]
    ref = [generate_ids(model, [p], max_tokens)[0] for p in prompts]
    on, eng_on = run(model, cfg, prompts, max_tokens)
    off, eng_off = run(model, dataclasses.replace(cfg, prefix_caching=False), prompts, max_tokens)
    assert on == ref and off == ref
    assert eng_on.preemptions >= 1 and eng_off.preemptions >= 1
    assert any(e["preempted"] for e in eng_off.step_log)
    assert eng_on.pages.stats.hits >= 3 * shared and eng_off.pages.stats.hits == 0
    assert any(len(e["prefills"]) >= 2 for e in eng_off.step_log)         # batched prefill: one packed step


def test_preemption_takes_the_highest_priority_value():
    """Two sequences that arrive in one step outgrow the pool: the earlier one, of priority 1, is preempted
    (FCFS alone would preempt the later one, of priority 0); both still give ``generate``'s tokens."""
    model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=48, min_token_bucket=8,
                       page_size=8, kv_cache_memory="8pages")
    prompts = [list(range(1, 9)), list(range(9, 17))]
    ref = [generate_ids(model, [p], 40)[0] for p in prompts]
    eng = Engine(model, None, cfg)
    eng.ready = True                                      # both queued before the engine's first step
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    streams = [eng.submit(p, params, priority=pr) for p, pr in zip(prompts, (1, 0))]
    eng.start(warmup=False)
    outs = [tokens(s)[0] for s in streams]
    eng.shutdown(5)
    assert outs == ref
    preempted = [rid for e in eng.step_log for rid in e["preempted"]]
    assert preempted and preempted[0] == streams[0].request_id, preempted


def test_kv_cache_memory_sizes():
    assert parse_kv_memory(1024) == ("bytes", 1024) and parse_kv_memory("2KiB") == ("bytes", 2048)
    assert parse_kv_memory("512MB") == ("bytes", 512 * 10**6) and parse_kv_memory("40pages") == ("pages", 40)
    for bad in ("", "0pages", "12 parsecs", "-5", 0, True):
        with pytest.raises(ConfigError, match="kv_cache_memory"):
            parse_kv_memory(bad)
    cfg = EngineConfig(max_num_seqs=2, max_model_len=31, page_size=8, kv_cache_memory="10pages")
    assert cfg.num_pages(100) == 11 and dataclasses.replace(cfg, kv_cache_memory=None).num_pages(100) == 9
    assert dataclasses.replace(cfg, kv_cache_memory=2000).num_pages(100) == 20
    with pytest.raises(ConfigError, match="needs 4"):
        dataclasses.replace(cfg, kv_cache_memory="3pages").num_pages(100)


def test_cli_kv_flags(capsys):
    from readme_jax.serve import __main__ as cli
    args = cli.parse_args(["--model", "m", "--kv-cache-memory", "64pages", "--no-prefix-caching", "--page-size", "8"])
    assert (args.kv_cache_memory, args.no_prefix_caching, args.page_size) == ("64pages", True, 8)
    assert not cli.parse_args(["--model", "m"]).no_prefix_caching
    assert cli.main(["--model", "absent", "--kv-cache-memory", "12 parsecs"]) == 2       # before loading
    assert "--kv-cache-memory" in capsys.readouterr().err
    assert cli.main(["--model", "absent", "--page-size", "0"]) == 2
