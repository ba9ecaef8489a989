"""PagedRunner: packed steps (staggered, chunked, batched prefill, decode) give each request the greedy tokens
``generate`` gives it alone, dense and Read-ME; no compile after warm-up; bad batches are refused."""

import numpy as np
import pytest

from readme_jax.generation import generate_ids
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from readme_jax.serve import paged_runner as pr
from readme_jax.serve.paged_runner import PagedRunner, StepBatch
from tests.tiny_models import random_model, random_tied_readme

pytestmark = pytest.mark.slow(reason="compiles every bucket of the packed step, dense and Read-ME")

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256)
RCFG = ReadMeConfig(base=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                                     num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=128),
                    num_experts=3, expert_dim=12,
                    router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=3, embed_rank=4,
                                        max_len=128))
PS = 4


def drive(runner, prompts, new_tokens, budget, arrivals):
    """A minimal host loop: request i arrives at step arrivals[i]; each step runs every running sequence's
    pending token, then prompt chunks within ``budget`` tokens; pages handed out in order. Returns the
    greedy tokens of each request."""
    n_req = len(prompts)
    next_page, tables = 1, {}
    done = {i: 0 for i in range(n_req)}          # tokens in cache
    pending, out, experts = {}, {i: [] for i in range(n_req)}, {}
    step = 0
    while any(len(out[i]) < new_tokens for i in range(n_req)):
        work = []                                # (req, tokens, experts)
        for i in range(n_req):
            if i in pending and len(out[i]) < new_tokens:
                work.append((i, [pending[i][0]], [pending[i][1]]))
        left = budget - len(work)
        for i in range(n_req):
            if arrivals[i] <= step and done[i] < len(prompts[i]) and left > 0 and i not in pending:
                if i not in experts:             # routed when admitted (the lookahead)
                    need = -(-(len(prompts[i]) + new_tokens + 1) // PS)
                    tables[i] = list(range(next_page, next_page + need))
                    next_page += need
                    p = prompts[i]
                    experts[i] = runner.route(p, np.arange(len(p)), [len(p)], [len(p)], [tables[i]])
                n = min(left, len(prompts[i]) - done[i])
                work.append((i, prompts[i][done[i]:done[i] + n], experts[i][done[i]:done[i] + n]))
                left -= n
        step += 1
        if not work:
            continue
        q = [len(t) for _, t, _ in work]
        kv = [done[i] + len(t) for i, t, _ in work]
        width = max(len(tables[i]) for i, _, _ in work)
        batch = StepBatch(
            tokens=np.concatenate([t for _, t, _ in work]).astype(np.int32),
            positions=np.concatenate([np.arange(k - n, k) for n, k in zip(q, kv)]).astype(np.int32),
            experts=np.concatenate([e for _, _, e in work]).astype(np.int32), q_lens=np.array(q),
            kv_lens=np.array(kv), page_tables=np.array([tables[i] + [0] * (width - len(tables[i]))
                                                        for i, _, _ in work]),
            sample=np.array([done[i] + len(t) >= len(prompts[i]) for i, t, _ in work]),
            route_next=np.array([done[i] + len(t) >= len(prompts[i]) for i, t, _ in work]),
            seeds=np.zeros(len(work), np.uint32), temperatures=np.zeros(len(work), np.float32),
            top_ps=np.ones(len(work), np.float32))
        res = runner.step(batch).result()
        for j, (i, t, _) in enumerate(work):
            done[i] += len(t)
            if batch.sample[j]:
                out[i].append(int(res.tokens[j]))
                pending[i] = (int(res.tokens[j]), int(res.next_experts[j]))
    return [o[:new_tokens] for o in out.values()]


def compiles() -> int:
    return pr._step._cache_size() + pr._route._cache_size()


@pytest.mark.parametrize("kind", ["dense", "readme", "readme-tied"])
def test_packed_steps_equal_generate_alone(kind, monkeypatch):
    """Staggered arrivals, prompts chunked past the budget, several prompts in one step, decode mixed with
    prefill: each request's greedy tokens equal generate's for it alone; warm-up compiles every bucket.
    Read-ME runs on the resident expert pool (every step's experts from the [L, k, ...] slots; k = E here,
    the pool's accounting is tests/test_resident.py's), routing prompts and sampled tokens itself; tied
    Read-ME on its channel tables, each step's kernel picked by its experts (masked from 2 distinct experts
    here: Fe = F / 2, else grouped), both kernels used."""
    if kind == "dense":
        model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)
        vocab = CFG.vocab_size
    elif kind == "readme":
        model = random_model(lambda rngs: ReadMe(RCFG, rngs=rngs), seed=2, std=0.3, overrides={"router.head": 1.0})
        vocab = RCFG.base.vocab_size
    else:
        model = random_tied_readme(RCFG, seed=2, std=0.3, overrides={"router.head": 1.0})
        vocab = RCFG.base.vocab_size
    runner = PagedRunner(model, num_pages=64, page_size=PS, max_num_seqs=4, max_num_batched_tokens=16,
                         max_model_len=32, min_token_bucket=16, expert_slots=3 if kind == "readme" else None)
    if kind == "readme":
        runner.pool.sync([2, 0, 1])
    runner.warmup()
    before = compiles()
    used = []
    if kind == "readme-tied":
        assert runner.dispatcher(16, [0, 0, -1]).name == "grouped" and runner.dispatcher(16, [2, 0, 2]).name == "masked"
        assert [d.name for d in runner.kernels(16)] == ["grouped", "masked"]
        pick = runner.dispatcher
        monkeypatch.setattr(runner, "dispatcher", lambda n, e=None: used.append(pick(n, e).name) or pick(n, e))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 19, 1, 9)]
    got = drive(runner, prompts, new_tokens=6, budget=16, arrivals=[0, 0, 2, 3])
    assert compiles() == before
    assert got == generate_ids(model, prompts, 6)       # left-padded rows equal each prompt alone
    if kind == "readme-tied":
        assert {"grouped", "masked"} <= set(used)
    if kind == "readme":
        assert runner.page_bytes > runner.cfg.num_layers * PS * 2 * 8 * 4


def test_bad_batches_are_refused():
    model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1)
    runner = PagedRunner(model, num_pages=8, page_size=PS, max_num_seqs=2, max_num_batched_tokens=8,
                         max_model_len=16)
    ok = dict(tokens=np.zeros(3, np.int32), positions=np.arange(3), experts=np.full(3, -1), q_lens=np.array([3]),
              kv_lens=np.array([3]), page_tables=np.array([[1]]), sample=np.ones(1, bool),
              route_next=np.zeros(1, bool), seeds=np.zeros(1), temperatures=np.zeros(1), top_ps=np.ones(1))
    with pytest.raises(ValueError, match="positions"):
        runner.step(StepBatch(**{**ok, "positions": np.array([1, 2, 3])}))
    with pytest.raises(ValueError, match="page ids"):
        runner.step(StepBatch(**{**ok, "page_tables": np.array([[8]])}))
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        runner.step(StepBatch(**{**ok, "tokens": np.zeros(9, np.int32), "positions": np.arange(9),
                                 "q_lens": np.array([9]), "kv_lens": np.array([9]),
                                 "page_tables": np.array([[1, 2, 3]])}))
    with pytest.raises(ValueError, match="copy_page"):
        runner.copy_page(0, 1)
    runner.kv = tuple(a.at[2].set(1.0) for a in runner.kv)
    runner.copy_page(2, 5)
    assert all(np.asarray(a[5]).min() == 1.0 for a in runner.kv)
    moe = random_model(lambda rngs: ReadMe(RCFG, rngs=rngs), seed=1)
    pooled = PagedRunner(moe, num_pages=8, page_size=PS, max_num_seqs=2, max_num_batched_tokens=8,
                         max_model_len=16, expert_slots=2)
    pooled.pool.sync([0, 2])
    with pytest.raises(ValueError, match=r"experts \[1\] are not resident"):
        pooled.step(StepBatch(**{**ok, "experts": np.array([0, 1, 2])}))
