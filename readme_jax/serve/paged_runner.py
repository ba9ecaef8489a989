"""The model side of the engine: one jitted, token-packed step over paged KV pools (docs/architecture.md).

    runner = PagedRunner(model, num_pages=P, page_size=16, max_num_seqs=32, max_num_batched_tokens=256,
                         max_model_len=2048)          # expert_slots=k (Read-ME), mesh=... (see below)
    runner.warmup()                                   # compiles every (token, sequence) bucket
    experts = runner.route(tokens, positions, q_lens, kv_lens, page_tables)   # Read-ME prompts: [n]
    runner.reset_row(row, bias_ids, bias_values)      # a request with penalties / logit_bias takes device row
    handle = runner.step(StepBatch(...))              # dispatched, not waited for
    out = handle.result()                             # StepResult(tokens [s], next_experts [s], logprobs ...)
    runner.copy_page(src, dst)                        # copy-on-write of a shared, partly filled page

Pages: one page id names the same page in the backbone's pool and (Read-ME) the router's: each is L arrays
in the attention backend's layout (``model/paged.py``: ``pool_layout``), page 0 the null page. The host owns allocation (page tables). A step's
tokens must sit on pages its tables name; a ``route_next`` row also writes the router's entry of the sampled
token at position kv_len, so its table must cover kv_len + 1 tokens.

One step: every scheduled token (decode tokens and prefill chunks of any number of sequences) in one packed
call: backbone (writing its new K/V), the LM head on the sampling rows only, per-row sampling
(``sampling.sample_rows``: an all-greedy step draws nothing) after the rows' logit processors
(``serve/step_sampling.py``: penalties and logit_bias from per-row state on the device, top-k / min-p; a step
where no row uses one skips them), the asked-for log-probabilities, and for Read-ME one router step on the sampled
tokens (the lookahead: the scheduler knows every waiting token's expert before the backbone runs). Shapes are
padded to a token bucket N (powers of two up to max_num_batched_tokens) and a sequence bucket S (powers of
two up to max_num_seqs); ``warmup`` compiles every pair, so no request compiles. Pools are donated.

Read-ME dispatch: each token bucket plans its experts with ``dispatch.default_dispatcher(N)``; with
``expert_slots=k`` the step reads experts only from the resident pool (``serve/resident.py``, [L, k, D, Fe])
and every expert a step uses must be resident (``runner.pool.sync`` first; a step naming a non-resident
expert is refused).

Under a mesh (``parallel/mesh.make_mesh``): params placed by ``parallel/sharding.param_shardings`` (XLA
inserts the all-gathers); the pools are replicated (every device holds every page, so any sequence's
attention runs where its tokens are); the resident pool is one device's memory, so a mesh refuses it.

Dimension names: n tokens, s sequences of a batch; N, S their buckets; P pages, ps page size, Mp pages per
sequence, L layers, E experts, k resident slots, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from readme_jax.model import dispatch
from readme_jax.model.decoder import unstack_layers
from readme_jax.model.packed import backbone_packed, head_rows, packed_layers, route_packed, router_layers
from readme_jax.model.paged import init_pages, pack_meta, page_bytes
from readme_jax.model.protocol import arch_config, is_routed
from readme_jax.parallel import sharding
from readme_jax.sampling import sample_rows
from readme_jax.serve import step_sampling
from readme_jax.serve.resident import ResidentPool
from readme_jax.serve.step_batch import StepBatch, StepHandle, StepResult  # noqa: F401 - the runner's API
from readme_jax.serve.step_sampling import (apply_row_processors, count_tokens, host_processors, prompt_logprobs,
                                            row_logprobs)

BLOCK_Q = 32          # query block of multi-token sequences (model/paged.py)


def _merge(graphdef, params):
    return nnx.merge(graphdef, *params)


@functools.partial(jax.jit, static_argnames=("graphdef", "dispatcher", "num_experts"),
                   donate_argnames=("kv", "rkv", "state"))
def _step(graphdef, params, layers, rlayers, kv, rkv, tokens, experts, meta, sample_idx, seeds, temps, top_ps,
          rmeta, route_rows, want_lp, state, proc, want_prompt, next_tokens, pool=None, dispatcher=None,
          num_experts=None):
    """The packed step (see the module doc): tokens/experts <int32>[N], meta a PagedMeta of N tokens and S
    sequences, sample_idx <int32>[S] (each sequence's last token), seeds/temps/top_ps [S]; Read-ME: rmeta
    the router's PagedMeta of one token per routed sequence (route_rows <int32>[S]: the sequence of each
    router row); want_lp <bool>[S]: the rows whose log-probabilities are returned; state / proc: the processors'
    device rows and this step's arrays (``step_sampling``); want_prompt (scalar bool) / next_tokens <int32>[N]: the
    prompt logprobs. Returns (kv, rkv, state, tokens <int32>[S], next experts <int32>[S], (<f32>[S],
    <int32>[S, K], <f32>[S, K]) of the sampled tokens, the same over the N tokens), K = MAX_LOGPROBS."""
    model = _merge(graphdef, params)
    if pool is not None:                          # the resident pool's k experts per layer as the FFN weights
        layers = tuple({**p, **{name: pool[name][l] for name in pool}} for l, p in enumerate(layers))
    x, kv = backbone_packed(model, layers, tokens, meta, kv, experts=experts if rkv is not None else None,
                            dispatcher=dispatcher, num_experts=num_experts)
    logits = head_rows(model, x[sample_idx])
    state = count_tokens(state, tokens, proc)
    processed = apply_row_processors(logits, state, proc)
    positions = meta.kv_lens                      # the sampled token's position in its sequence
    tok = sample_rows(processed, seeds, positions, temps, top_ps, proc["top_k"], proc["min_p"])
    lp = row_logprobs(logits, tok, want_lp)       # vLLM's default: logprobs of the raw logits
    plp = prompt_logprobs(lambda h: head_rows(model, h), x, next_tokens, want_prompt)
    nxt = jnp.full_like(tok, -1)
    if rkv is not None:
        ids, rkv = route_packed(model.router, rlayers, tok[route_rows], rmeta, rkv)
        routed = rmeta.positions >= 0
        nxt = nxt.at[jnp.where(routed, route_rows, tok.shape[0])].set(ids, mode="drop")
    return kv, rkv, state, tok, nxt, lp, plp


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("rkv",))
def _route(graphdef, params, rlayers, rkv, tokens, meta):
    """The router over N packed prompt tokens: (rkv, experts <int32>[N])."""
    ids, rkv = route_packed(_merge(graphdef, params).router, rlayers, tokens, meta, rkv)
    return rkv, ids


@functools.partial(jax.jit, donate_argnames=("pools",))
def _copy_page(pools, src, dst):
    return jax.tree.map(lambda a: a.at[dst].set(a[src]), pools)


def _bucket(n: int, buckets: tuple[int, ...], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"PagedRunner: {n} {what} exceed the largest bucket {buckets[-1]}")


def _pow2_upto(limit: int, start: int = 1) -> tuple[int, ...]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


class PagedRunner:
    """Owns the params, the page pools and the compiled steps (see the module docstring)."""

    def __init__(self, model, *, num_pages: int, page_size: int = 16, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, expert_slots: int | None = None,
                 mesh: jax.sharding.Mesh | None = None, min_token_bucket: int = 8,
                 dispatcher: dispatch.Dispatcher | None = None):
        if mesh is not None and expert_slots is not None:
            raise ValueError("PagedRunner: expert_slots (the resident expert pool) lives on one device and "
                             "cannot be combined with a mesh; pass one of them")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"PagedRunner: max_num_batched_tokens={max_num_batched_tokens} must be >= "
                             f"max_num_seqs={max_num_seqs} (a decode step runs one token per sequence)")
        self.is_moe = is_routed(model)
        self.fixed_dispatcher = dispatcher
        self.cfg = arch_config(model)
        self.page_size, self.num_pages, self.max_model_len = page_size, num_pages, max_model_len
        self.max_pages_per_seq = -(-(max_model_len + 1) // page_size)        # + 1: the router's lookahead entry
        self.token_buckets = _pow2_upto(max_num_batched_tokens, min(min_token_bucket, max_num_batched_tokens))
        self.seq_buckets = _pow2_upto(max_num_seqs)
        self.route_buckets = _pow2_upto(max(max_model_len, max_num_batched_tokens),
                                        min(min_token_bucket, max_num_batched_tokens))
        self.graphdef, state = nnx.split(model)
        replicated = None
        if mesh is not None:
            state = sharding.place(state, sharding.param_shardings(state, mesh))
            model = nnx.merge(self.graphdef, state)
            replicated = NamedSharding(mesh, PartitionSpec())
        self.model = model
        self.params = (state,)
        self.pool = None
        self._layers: dict = {}
        if expert_slots is not None:
            if not self.is_moe:
                raise ValueError("PagedRunner: expert_slots needs a Read-ME model (a dense model has no experts)")
            self.pool = ResidentPool(model.experts.fused(), expert_slots)
            # the step's params hold no expert weights (zero-size stand-ins), its layers only attention's
            self.graphdef, experts, rest = nnx.split(model, nnx.PathContains("experts"), ...)
            self.params = (jax.device_put(jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), experts)), rest)
            self._layers = {None: unstack_layers(model.attn.arrays())}
        self.rlayers = router_layers(model.router) if self.is_moe else None
        # the masked kernel (tied experts' channel tables) where the step's experts make it read less
        self.masked = dispatch.get("masked") if (self.is_moe and model.tied and self.pool is None and dispatcher
                                                 is None and jax.default_backend() == "cpu") else None
        if self.is_moe:
            self.num_experts, self.expert_dim = model.num_experts, model.config.expert_dim
            self.channels = self.cfg.intermediate_size

        def pools():
            kv = init_pages(self.cfg, num_pages, page_size)
            rkv = init_pages(model.router.config.trunk_config(), num_pages, page_size) if self.is_moe else None
            return kv, rkv
        # placed (committed) from the start, as every step's donated outputs are: the first step's arguments
        # then match the later steps' and warm-up's compile serves them
        where = replicated or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.kv, self.rkv = jax.jit(pools, out_shardings=where)()
        self.proc_rows = max_num_seqs                 # device rows of per-request processor state
        self.state = jax.jit(lambda: step_sampling.init_row_state(max_num_seqs, self.cfg.vocab_size),
                             out_shardings=where)()
        rbytes = page_bytes(model.router.config.trunk_config(), page_size) if self.is_moe else 0
        self.page_bytes = page_bytes(self.cfg, page_size) + rbytes

    # --- per-bucket pieces -------------------------------------------------------------------------------
    def dispatcher(self, num_tokens: int, experts=None) -> dispatch.Dispatcher | None:
        """The dispatcher of a step of ``num_tokens`` (bucket) tokens whose tokens use ``experts`` (ids; None:
        unknown): the one given to the runner (the serve CLI's ``--dispatcher``); else, for tied experts on
        CPU without a resident pool, the masked kernel when the step's distinct experts hold at least the
        tables' channels (u x Fe >= F: it reads F columns, the per-expert kernels u x Fe), and always above
        ``dispatch.GROUPED_MAX_TOKENS`` tokens (prefill chunks, whose tokens span experts: measured 1.0-2.4x
        faster than blocked there, see ``model/dispatch/masked.py``); else ``dispatch.default_dispatcher``
        (grouped at decode sizes on CPU: its windows run a lone decode row as one row, where "decode" runs the
        whole bucket's rows, 42 vs 32 ms per token at 1 slot). None for a dense model."""
        if not self.is_moe:
            return None
        if self.fixed_dispatcher is not None:
            return self.fixed_dispatcher
        if self.masked is not None:
            if num_tokens > dispatch.GROUPED_MAX_TOKENS:
                return self.masked
            used = 0 if experts is None else len({int(e) for e in experts if 0 <= e < self.num_experts})
            if used * self.expert_dim >= self.channels:
                return self.masked
        return dispatch.default_dispatcher(num_tokens)

    def layers(self, d: dispatch.Dispatcher | None) -> tuple[dict, ...]:
        """The per-layer weights in ``d``'s layout, made once per dispatcher (the resident pool: attention only)."""
        if self.pool is not None:
            return self._layers[None]
        if d not in self._layers:
            self._layers[d] = packed_layers(self.model, d)
        return self._layers[d]

    def _meta(self, q_lens, kv_lens, tables, N, S):
        return pack_meta(q_lens, kv_lens, self._tables(tables), page_size=self.page_size, num_tokens=N,
                         num_decode=S, num_blocks=-(-N // BLOCK_Q) + min(S, N // 2), block_q=BLOCK_Q, num_seqs=S)

    def _tables(self, tables) -> np.ndarray:
        tables = np.asarray(tables, np.int32)
        if tables.ndim != 2 or tables.shape[1] > self.max_pages_per_seq:
            raise ValueError(f"PagedRunner: page_tables must be [s, <= {self.max_pages_per_seq}], got {tables.shape}")
        if tables.size and (tables.min() < 0 or tables.max() >= self.num_pages):
            raise ValueError(f"PagedRunner: page ids must be in [0, {self.num_pages}), got "
                             f"[{tables.min()}, {tables.max()}]")
        out = np.zeros((tables.shape[0], self.max_pages_per_seq), np.int32)
        out[:, :tables.shape[1]] = tables
        return out

    def _check_positions(self, positions, q_lens, kv_lens):
        q_lens, kv_lens = np.asarray(q_lens, np.int64), np.asarray(kv_lens, np.int64)
        seq = np.repeat(np.arange(len(q_lens)), q_lens)
        want = (kv_lens - q_lens)[seq] + np.arange(len(seq)) - (np.cumsum(q_lens) - q_lens)[seq]
        if np.asarray(positions).shape != want.shape or (np.asarray(positions) != want).any():
            raise ValueError("PagedRunner: positions must be kv_len - q_len .. kv_len - 1 of each sequence, "
                             "in order")

    # --- the API -----------------------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> StepHandle:
        """Dispatch one packed step (see the module docstring); returns without waiting."""
        n, s = len(batch.tokens), len(batch.q_lens)
        if s == 0:
            raise ValueError("PagedRunner.step: a step needs at least one sequence")
        self._check_positions(batch.positions, batch.q_lens, batch.kv_lens)
        N, S = _bucket(n, self.token_buckets, "tokens"), _bucket(s, self.seq_buckets, "sequences")
        N = max(N, _bucket(S, self.token_buckets, "tokens"))
        return self._dispatch(batch, n, s, N, S)

    def _dispatch(self, batch: StepBatch, n, s, N, S, d: dispatch.Dispatcher | None = None) -> StepHandle:
        meta = self._meta(batch.q_lens, batch.kv_lens, batch.page_tables, N, S)
        tokens = np.zeros(N, np.int32)
        tokens[:n] = batch.tokens
        experts = np.full(N, -1, np.int32)
        num_experts = None
        if self.is_moe:
            ex = np.asarray(batch.experts, np.int32)
            if self.pool is not None:
                slots = np.asarray(self.pool.remap(ex), np.int32)
                missing = sorted({int(e) for e, j in zip(ex, slots) if j < 0 and 0 <= e < self.pool.num_experts})
                if missing:
                    raise ValueError(f"PagedRunner.step: experts {missing} are not resident (pool.sync first)")
                ex, num_experts = slots, self.pool.capacity
            experts[:n] = ex

        def rows(values, fill, dtype):
            out = np.full(S, fill, dtype)
            out[:len(values)] = values          # route_rows: only the routed sequences' rows
            return out
        sample_idx = rows(np.cumsum(batch.q_lens) - 1, 0, np.int32)
        rmeta = route_rows = None
        if self.is_moe:
            routed = np.flatnonzero(np.asarray(batch.route_next, bool))
            kv_lens = np.asarray(batch.kv_lens)
            rmeta = pack_meta(np.ones(len(routed), np.int64), kv_lens[routed] + 1,
                              self._tables(batch.page_tables)[routed], page_size=self.page_size, num_tokens=S,
                              num_decode=S, num_blocks=0, block_q=1, num_seqs=S)
            route_rows = rows(routed, 0, np.int32)
        d = d or self.dispatcher(N, experts[:n])
        want = rows(np.zeros(s, bool) if batch.logprobs is None else batch.logprobs, False, bool)
        proc = host_processors(batch, n, s, N, S, self.proc_rows)
        want_prompt = batch.prompt_logprobs is not None and bool(np.any(batch.prompt_logprobs))
        next_tokens = np.zeros(N, np.int32)
        if want_prompt:
            next_tokens[:n] = batch.next_tokens
        kv, rkv, self.state, tok, nxt, lp, plp = _step(
            self.graphdef, self.params, self.layers(d), self.rlayers, self.kv, self.rkv, tokens, experts, meta,
            sample_idx, rows(batch.seeds, 0, np.uint32).astype(np.int32), rows(batch.temperatures, 0, np.float32),
            rows(batch.top_ps, 1, np.float32), rmeta, route_rows, want, self.state, proc, np.bool_(want_prompt),
            next_tokens, pool=None if self.pool is None else self.pool.fast, dispatcher=d, num_experts=num_experts)
        self.kv, self.rkv = kv, rkv
        return StepHandle(tok, nxt, s, lp, plp if want_prompt else None, n)

    def route(self, tokens, positions, q_lens, kv_lens, page_tables) -> np.ndarray:
        """The router over packed prompt tokens (several prompts allowed), writing its K/V into their pages ->
        each token's expert <int32>[n] (-1 everywhere for a dense model, which has no router)."""
        n = len(tokens)
        if not self.is_moe:
            return np.full(n, -1, np.int32)
        self._check_positions(positions, q_lens, kv_lens)
        N = _bucket(n, self.route_buckets, "prompt tokens")
        S = _bucket(len(q_lens), self.seq_buckets, "sequences")
        meta = self._meta(q_lens, kv_lens, page_tables, N, S)
        padded = np.zeros(N, np.int32)
        padded[:n] = tokens
        self.rkv, ids = _route(self.graphdef, self.params, self.rlayers, self.rkv, padded, meta)
        return np.asarray(ids)[:n]

    def reset_row(self, row: int, bias_ids=(), bias_values=()) -> None:
        """Device row ``row`` (< max_num_seqs) of the processor state cleared for a new sequence, with its
        logit_bias (token ids, values)."""
        if not 0 <= row < self.proc_rows:
            raise ValueError(f"PagedRunner.reset_row: row {row} is not in [0, {self.proc_rows})")
        self.state = step_sampling.reset_row(self.state, row, list(bias_ids), list(bias_values))

    def copy_page(self, src: int, dst: int) -> None:
        """Page ``dst`` := page ``src`` in every layer of both pools (copy-on-write of a shared page)."""
        for p in (src, dst):
            if not 1 <= p < self.num_pages:
                raise ValueError(f"PagedRunner.copy_page: page {p} is not in [1, {self.num_pages})")
        self.kv, self.rkv = _copy_page((self.kv, self.rkv), jnp.int32(src), jnp.int32(dst))

    def warmup(self) -> None:
        """Compile every (token, sequence) bucket of ``step`` and every ``route`` bucket, so no request compiles
        later. Each call runs one token on page 1 (its entries are garbage until a sequence writes them, and
        a sequence reads only entries it wrote): call it before serving, when no page holds a prefix."""
        for N in self.token_buckets:
            for S in self.seq_buckets:
                if S <= N:
                    for d in self.kernels(N):
                        self._warm_step(N, S, d)
        if self.is_moe:
            for N in self.route_buckets:
                meta = self._meta([1], [1], [[1]], N, 1)
                self.rkv, _ = _route(self.graphdef, self.params, self.rlayers, self.rkv, np.zeros(N, np.int32), meta)
        self.reset_row(0)
        jax.block_until_ready((self.kv, self.rkv, self.state))

    def kernels(self, num_tokens: int) -> list:
        """Every dispatcher a step of ``num_tokens`` (bucket) tokens may use (``dispatcher``); [None] dense."""
        out = [self.dispatcher(num_tokens)]
        if self.masked is not None and self.masked not in out:
            out.append(self.masked)
        return out

    def _warm_step(self, N, S, d):
        """One step of the (N, S) bucket with dispatcher ``d``: one sequence of one token on page 1."""
        z = np.zeros(1, np.int32)
        batch = StepBatch(tokens=z, positions=z, experts=np.full(1, -1, np.int32), q_lens=np.ones(1, np.int32),
                          kv_lens=np.ones(1, np.int32), page_tables=np.ones((1, 1), np.int32),
                          sample=np.ones(1, bool), route_next=np.ones(1, bool), seeds=z,
                          temperatures=np.zeros(1, np.float32), top_ps=np.ones(1, np.float32))
        self._dispatch(batch, 1, 1, N, S, d).result()
