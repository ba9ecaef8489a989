"""Expert parallelism as one more dispatcher: tokens travel to the device that owns their expert and back.

The experts' E axis is laid out over the mesh's "expert" axis (M devices) as M x El *slots*:
  E >= M: El = ceil(E / M) experts per device, slot s holds expert s; slots past E (E = 7 on M = 4: slot 7)
          are empty - zero weights that no token is ever sent to, so the local kernel gives them no rows and
          runs no block for them.
  E <  M: M % E == 0; El = 1 and every expert is *replicated* on R = M / E devices (E = 4 on 8: expert e
          on devices 2e and 2e + 1); a token of expert e from the device at position x on the axis goes to
          replica x % R, so each replica serves 1/R of the sources. Replicas' gradients are summed (the
          transpose of the gather that builds the slots). Fe is never split: a row's SwiGLU stays on one device.

Every device of the mesh (axes data, fsdp, expert) holds n of the N tokens. Strategies:
  "all_to_all" (default): each device packs its tokens into a send buffer [M, C, D] by destination, one
      ``all_to_all`` over "expert" delivers [M, C, D] (C rows from each source), the local experts run on
      those M*C rows, a second all_to_all brings the outputs back, a gather restores token order. The
      capacity C is static: routing is known on the host before the step (the pre-gating router), so
      the step's largest (source, destination) count is known and C is the smallest bucket of
      :func:`capacity_buckets` above it - no token is ever dropped (``plan.dropped`` counts the ones a
      too-small C would drop; the trainer checks it is 0) and padding stays below one bucket ratio.
  "all_gather": every device all-gathers the n tokens of the M devices on its axis, runs its slots on the
      ones routed to them, and ``psum_scatter`` returns the partial sums: M x n rows each way per device,
      whatever the routing. The baseline of ``python -m benchmarks ep``.
``ragged_all_to_all`` (send only the routed rows, no capacity) would cut the padding further on GPU/TPU;
CPU does not implement it, so it is not built here (docs/architecture.md).

Dimension names: N tokens (all devices), n tokens per device, D model, Fe expert width, E experts,
M devices on the "expert" axis, El slots per device, C capacity (rows per source and destination).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from readme_jax.model.dispatch import Blocked, Dispatcher
from readme_jax.model.dispatch.base import Plan, gather_rows, group_ranks
from readme_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS

STRATEGIES = ("all_to_all", "all_gather")


def slot_layout(num_experts: int, m: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(El, slot_expert <int32>[M * El] (-1: empty slot), dest <int32>[M, E]: the slot a token of expert e
    from axis position x goes to). ValueError when E < M and M is not a multiple of E."""
    E = num_experts
    if E >= m:
        el = -(-E // m)
        slot_expert = np.array([s if s < E else -1 for s in range(m * el)], np.int32)
        dest = np.tile(np.arange(E, dtype=np.int32), (m, 1))
        return el, slot_expert, dest
    if m % E:
        raise ValueError(f"expert parallelism: {E} experts on an 'expert' axis of {m} devices: with fewer experts "
                         f"than devices the axis must be a multiple of E (each expert replicated M / E times)")
    r = m // E
    slot_expert = np.arange(m, dtype=np.int32) // r
    dest = np.array([[e * r + x % r for e in range(E)] for x in range(m)], np.int32)
    return 1, slot_expert, dest


def capacity_buckets(n_local: int, m: int, max_buckets: int = 8) -> tuple[int, ...]:
    """The static capacities a step may use: geometric from ceil(n / M) (perfectly balanced routing; no
    (source, destination) count can be lower for the largest pair) to n (every token to one device),
    at most ``max_buckets`` of them, each a multiple of 8 rows (or n)."""
    lo, hi = -(-n_local // m), n_local
    if lo >= hi:
        return (hi,)
    ratio = (hi / lo) ** (1.0 / (max_buckets - 1))
    out = sorted({min(hi, 8 * -(-math.ceil(lo * ratio ** k) // 8)) for k in range(max_buckets)})
    return tuple(out) if out[-1] == hi else tuple(out) + (hi,)


def pick_capacity(max_count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``max_count`` rows (the step's largest (source, destination) count)."""
    for c in buckets:
        if c >= max_count:
            return c
    raise ValueError(f"pick_capacity: {max_count} rows exceed the largest bucket {buckets[-1]}")


@flax.struct.dataclass
class ExpertParallelPlan(Plan):
    """Where each token goes, made once per batch (outside the layer scan).

    send_pos      <int32>[N]          each token's row in its device's send buffer (all_to_all: dest * C + rank;
                                      all_gather: its row n*x + i among the gathered tokens)
    token_of_row  <int32>[dev * R]    the token in each of a device's R rows (n: none); R = M*C or M*n
    inner         the local dispatcher's plan of each device's received rows (every leaf with a leading
                  device axis)
    counts        <int32>[dev, M]     tokens each device sends to each device of its "expert" axis
    group_sizes   <int32>[E]          tokens per expert over the whole batch
    dropped       <int32>[]           tokens beyond the capacity (0 whenever C came from pick_capacity)
    """

    send_pos: jnp.ndarray
    token_of_row: jnp.ndarray
    inner: object
    counts: jnp.ndarray
    dropped: jnp.ndarray

    @property
    def num_tokens(self) -> int:
        return self.send_pos.shape[0]


@dataclasses.dataclass(frozen=True)
class ExpertParallel(Dispatcher):
    """Expert-parallel dispatch over ``mesh`` (axes BATCH_AXES; experts on "expert"). ``capacity``: C rows
    per (source, destination) pair of the all_to_all (static; from :func:`pick_capacity`); ``local``: the
    kernel on each device's rows. Tokens (and the h rows given to ``moe_ffn``) are split over every mesh
    axis; weights come in any sharding (they are laid out as slots, split over "expert", inside)."""

    mesh: jax.sharding.Mesh
    capacity: int = 0
    local: Dispatcher = Blocked()
    strategy: str = "all_to_all"
    name = "expert_parallel"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ExpertParallel: strategy {self.strategy!r}, expected one of {STRATEGIES}")
        if self.strategy == "all_to_all" and self.capacity < 1:
            raise ValueError("ExpertParallel: the all_to_all strategy needs capacity >= 1 (pick_capacity)")

    @property
    def m(self) -> int:
        return self.mesh.shape[EXPERT_AXIS]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def _smap(self, f, in_specs, out_specs):
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def rows_per_device(self, n_local: int) -> int:
        """Rows each device's local kernel runs: M * C (all_to_all) or M * n (all_gather)."""
        return self.m * (self.capacity if self.strategy == "all_to_all" else n_local)

    # ------------------------------------------------------------------------------------ plan
    def plan(self, expert_ids: jnp.ndarray, num_experts: int) -> ExpertParallelPlan:
        """expert_ids <int32>[B, T] (B split over every mesh axis) or [N] -> ExpertParallelPlan."""
        m, E = self.m, num_experts
        el, _, dest_np = slot_layout(E, m)
        dest_tab = jnp.asarray(dest_np)
        ids = expert_ids.reshape(-1).astype(jnp.int32)
        if ids.shape[0] % self.devices:
            raise ValueError(f"ExpertParallel: {ids.shape[0]} tokens are not divisible by the {self.devices} devices")
        C = self.capacity

        def local(ids):
            n = ids.shape[0]
            x = jax.lax.axis_index(EXPERT_AXIS)
            valid = (ids >= 0) & (ids < E)
            slot = jnp.where(valid, dest_tab[x, jnp.where(valid, ids, 0)], -1)             # [n]
            dev = jnp.where(valid, slot // el, m)                                           # m: no device
            lid = slot % el
            _, _, counts, rank = group_ranks(dev, m)                                        # counts [M]
            sizes = jax.lax.psum(jax.nn.one_hot(ids, E, dtype=jnp.int32).sum(0), BATCH_AXES)
            if self.strategy == "all_to_all":
                ok = valid & (rank < C)
                send_pos = jnp.where(ok, dev * C + rank, m * C).astype(jnp.int32)
                rows = m * C
                send_ids = jnp.full((rows,), -1, jnp.int32).at[send_pos].set(lid, mode="drop")
                recv_ids = jax.lax.all_to_all(send_ids.reshape(m, C), EXPERT_AXIS, 0, 0, tiled=True).reshape(-1)
                dropped = jax.lax.psum(jnp.sum(jnp.maximum(counts - C, 0)), BATCH_AXES)
            else:
                send_pos = (x * n + jnp.arange(n, dtype=jnp.int32)).astype(jnp.int32)
                rows = m * n
                all_dev = jax.lax.all_gather(dev, EXPERT_AXIS, tiled=True)                  # [M * n]
                recv_ids = jnp.where(all_dev == x, jax.lax.all_gather(lid, EXPERT_AXIS, tiled=True), -1)
                dropped = jnp.zeros((), jnp.int32)
            token_of_row = jnp.full((rows,), n, jnp.int32).at[send_pos].set(
                jnp.arange(n, dtype=jnp.int32), mode="drop")
            inner = jax.tree.map(lambda a: a[None], self.local.plan(recv_ids, el))
            return send_pos, token_of_row, inner, counts[None], sizes, dropped

        spec = P(BATCH_AXES)
        inner_abs = jax.eval_shape(lambda: self.local.plan(jnp.zeros((self.rows_per_device(
            ids.shape[0] // self.devices),), jnp.int32), el))
        inner_spec = jax.tree.map(lambda _: spec, inner_abs)
        send_pos, token_of_row, inner, counts, sizes, dropped = self._smap(
            local, (spec,), (spec, spec, inner_spec, spec, P(), P()))(ids)
        return ExpertParallelPlan(send_pos=send_pos, token_of_row=token_of_row, inner=inner, counts=counts,
                                  group_sizes=sizes, dropped=dropped, dispatcher=self, num_experts=E)

    # ------------------------------------------------------------------------------- the steps
    def permute(self, plan: ExpertParallelPlan, h: jnp.ndarray) -> jnp.ndarray:
        """h [N, D] (split over every axis) -> each device's received rows [dev * R, D]."""
        m, C = self.m, self.capacity

        def local(h, send_pos, token_of_row):
            if self.strategy == "all_gather":
                return jax.lax.all_gather(h, EXPERT_AXIS, tiled=True)
            send = gather_rows(h, token_of_row, send_pos)                                   # [M*C, D]
            return jax.lax.all_to_all(send.reshape(m, C, -1), EXPERT_AXIS, 0, 0, tiled=True).reshape(m * C, -1)

        spec = P(BATCH_AXES)
        with jax.named_scope("ep_dispatch"):
            return self._smap(local, (spec, spec, spec), spec)(h, plan.send_pos, plan.token_of_row)

    def expert_ffn(self, plan: ExpertParallelPlan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [dev * R, D] -> [dev * R, D]: each device's slots (E laid out as M x El slots over "expert") on
        its rows, with the local dispatcher. w_gate/w_up [E, D, Fe], w_down [E, Fe, D]."""
        _, slot_expert, _ = slot_layout(plan.num_experts, self.m)
        idx = jnp.asarray(slot_expert)
        slots = [jnp.take(w, idx, axis=0, mode="fill", fill_value=0) for w in (w_gate, w_up, w_down)]

        def local(x, inner, wg, wu, wd):
            inner = jax.tree.map(lambda a: a[0], inner)
            d = self.local
            return d.unpermute(inner, d.expert_ffn(inner, d.permute(inner, x), wg, wu, wd))

        spec, wspec = P(BATCH_AXES), P(EXPERT_AXIS)
        inner_spec = jax.tree.map(lambda _: spec, plan.inner)
        with jax.named_scope("ep_experts"):
            return self._smap(local, (spec, inner_spec, wspec, wspec, wspec), spec)(x, plan.inner, *slots)

    def unpermute(self, plan: ExpertParallelPlan, y: jnp.ndarray) -> jnp.ndarray:
        """Each device's output rows [dev * R, D] -> [N, D] in token order."""
        m, C = self.m, self.capacity

        def local(y, send_pos, token_of_row):
            if self.strategy == "all_gather":
                return jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
            back = jax.lax.all_to_all(y.reshape(m, C, -1), EXPERT_AXIS, 0, 0, tiled=True).reshape(m * C, -1)
            return gather_rows(back, send_pos, token_of_row)

        spec = P(BATCH_AXES)
        with jax.named_scope("ep_combine"):
            return self._smap(local, (spec, spec, spec), spec)(y, plan.send_pos, plan.token_of_row)


def dispatch_counts(expert_ids: jnp.ndarray, num_experts: int, mesh: jax.sharding.Mesh) -> jnp.ndarray:
    """<int32>[dev, M]: tokens each device sends to each device of its "expert" axis, for expert_ids
    [..., B, T] split over the mesh on B (every leading axis, e.g. micro-batches, summed per device as its
    largest entry decides). Jit it; its device_get is the one small transfer per step that picks C."""
    m = mesh.shape[EXPERT_AXIS]
    el, _, dest_np = slot_layout(num_experts, m)
    dest_tab = jnp.asarray(dest_np)

    def local(ids):
        x = jax.lax.axis_index(EXPERT_AXIS)
        flat = ids.reshape(ids.shape[0], -1) if ids.ndim > 2 else ids.reshape(1, -1)
        valid = (flat >= 0) & (flat < num_experts)
        dev = jnp.where(valid, dest_tab[x, jnp.where(valid, flat, 0)] // el, m)
        per = jax.nn.one_hot(dev, m, dtype=jnp.int32).sum(1)                             # [A, M]
        return jnp.max(per, axis=0)[None]

    lead = expert_ids.ndim - 2
    spec = P(*([None] * lead), BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=P(BATCH_AXES))(expert_ids)
