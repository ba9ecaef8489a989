"""Expert parallelism (parallel/expert_parallel.py) on 8 simulated CPU devices: the MoE layer's output and
gradients (h and the three weights) equal the single-device reference for meshes (data, fsdp, expert) that
split, pad (E = 7 on 4: one empty slot) and replicate (E = 4 on 8) the experts, under random and skewed
routing, with both strategies; the host-picked capacity drops nothing, a too-small one is reported, and the
capacity buckets bound the compiles."""

import math

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from readme_jax.model import moe
from readme_jax.parallel import expert_parallel as ep
from readme_jax.parallel.mesh import BATCH_AXES, make_mesh

D, FE = 16, 12
B, T = 16, 6                 # N = 96 tokens, n = 12 per device



def _mesh(sizes):
    return make_mesh(dict(zip(("data", "fsdp", "expert"), sizes)))


# Data from numpy: eager jax.random compiles a program per shape, seconds each here.
def _normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _weights(rng, E):
    return _normal(rng, (E, D, FE), 0.25), _normal(rng, (E, D, FE), 0.25), _normal(rng, (E, FE, D), 0.2)


def _ids(routing, E, rng, shape=(B, T)):
    if routing == "random":
        return rng.integers(0, E, shape).astype(np.int32)
    if routing == "skewed":                 # every token on the last expert (E = 7 on 4: next to the empty slot)
        return np.full(shape, E - 1, np.int32)
    raise ValueError(routing)


def _capacity(ids, E, mesh):
    """The host's pick: the smallest bucket above the largest (source, destination) count."""
    counts = np.asarray(jax.jit(ep.dispatch_counts, static_argnums=(1, 2))(ids, E, mesh))
    n = ids.size // math.prod(mesh.shape.values())
    return ep.pick_capacity(int(counts.max()), ep.capacity_buckets(n, mesh.shape["expert"])), counts


def _value_and_grads(layer):
    """layer (ids, h, ws) -> (out, dropped) as one program: (ids, h, ws, cot) -> (out, dropped, (dh, dws))."""
    def f(ids, h, ws, cot):
        out, vjp, dropped = jax.vjp(lambda h, ws: layer(ids, h, ws), h, ws, has_aux=True)
        return out, dropped, vjp(cot)
    return jax.jit(f)


@jax.jit
def _reference(ids, h, ws, cot):
    out, vjp = jax.vjp(lambda h, ws: moe.reference_moe_ffn(ids, h, *ws), h, ws)
    return out, vjp(cot)


CASES = [  # (data, fsdp, expert), E, routing, strategy
    ((1, 1, 8), 8, "random", "all_to_all"),    # one expert per device
    ((1, 1, 8), 8, "skewed", "all_gather"),
    ((2, 1, 4), 7, "random", "all_to_all"),    # 2 slots per device, slot 7 empty
    ((2, 1, 4), 7, "skewed", "all_to_all"),
    ((1, 1, 8), 4, "random", "all_to_all"),    # each expert on 2 devices, replicas' grads summed
    ((1, 1, 8), 4, "skewed", "all_to_all"),
    ((1, 1, 8), 4, "random", "all_gather"),
    ((2, 2, 2), 8, "skewed", "all_to_all"),    # 4 experts per device, tokens over all three axes
    ((2, 2, 2), 8, "random", "all_gather"),
    ((1, 2, 4), 4, "skewed", "all_to_all"),
]


@pytest.mark.slow(reason="compiles sharded steps on the 8-device mesh")
@pytest.mark.parametrize("sizes,E,routing,strategy", CASES)
def test_layer_and_grads_match_single_device(sizes, E, routing, strategy, record_property):
    mesh = _mesh(sizes)
    rng = np.random.default_rng(sum(sizes) * 10 + E)
    h, cot = _normal(rng, (B, T, D)), _normal(rng, (B, T, D))
    ws = _weights(rng, E)
    ids = _ids(routing, E, rng)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(BATCH_AXES)))  # noqa: E731
    C, counts = _capacity(put(ids), E, mesh)
    d = ep.ExpertParallel(mesh=mesh, capacity=C, strategy=strategy)

    def layer(ids, h, ws):
        plan = moe.plan_dispatch(ids, E, dispatcher=d)
        return moe.moe_ffn(plan, h, *ws), plan.dropped

    out, dropped, grads = _value_and_grads(layer)(put(ids), put(h), ws, put(cot))
    devices = math.prod(sizes)
    padding = d.rows_per_device(B * T // devices) * devices - B * T
    record_property("padding_rows", padding)
    info = f"{sizes} E={E} {routing} {strategy}: C={C} max count {counts.max()}, padding rows {padding}"
    assert int(dropped) == 0, info
    ref_out, ref_grads = _reference(ids, h, ws, cot)
    chex.assert_trees_all_close((out, grads), (ref_out, ref_grads), atol=1e-5, rtol=1e-5,
                                custom_message=info)


def test_too_small_capacity_reports_drops():
    mesh = _mesh((1, 1, 8))
    E = 8
    ids = jax.device_put(_ids("skewed", E, np.random.default_rng(0)), NamedSharding(mesh, P(BATCH_AXES)))
    C, counts = _capacity(ids, E, mesh)
    assert C == B * T // 8 and counts.max() == C                   # all n tokens of a device go one way
    small = C - 4
    plan = jax.jit(lambda i: ep.ExpertParallel(mesh=mesh, capacity=small).plan(i, E))(ids)
    assert int(plan.dropped) == int(np.maximum(counts - small, 0).sum()) > 0


@pytest.mark.parametrize("n,m", [(12, 8), (12, 2), (3, 8), (8, 1), (512, 8), (1000, 4), (4096, 16)])
def test_capacity_buckets_and_pick(n, m):
    buckets = ep.capacity_buckets(n, m)
    assert 1 <= len(buckets) <= 8
    assert all(a < b for a, b in zip(buckets, buckets[1:]))
    assert buckets[0] >= -(-n // m) and buckets[-1] == n
    for count in range(n + 1):
        c = ep.pick_capacity(count, buckets)
        i = buckets.index(c)
        assert c >= count and (i == 0 or buckets[i - 1] < count)
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        ep.pick_capacity(n + 1, buckets)


@pytest.mark.slow(reason="compiles sharded steps on the 8-device mesh")
def test_compiles_stay_within_the_buckets():
    """20 routings from uniform to all-on-one-expert: one compile per capacity used, never more."""
    mesh = _mesh((1, 1, 8))
    E, shape = 8, (16, 16)                     # n = 32 per device
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(BATCH_AXES)))  # noqa: E731
    buckets = ep.capacity_buckets(32, 8)
    traces = []

    @jax.jit
    def counts_of(ids):
        return ep.dispatch_counts(ids, E, mesh)

    def layer(ids, h, ws, capacity):
        traces.append(capacity)
        plan = moe.plan_dispatch(ids, E, dispatcher=ep.ExpertParallel(mesh=mesh, capacity=capacity))
        return moe.moe_ffn(plan, h, *ws), plan.dropped

    step = jax.jit(layer, static_argnames="capacity")
    rng = np.random.default_rng(0)
    ws = _weights(rng, E)
    h = put(_normal(rng, shape + (D,)))
    used = set()
    for skew in np.linspace(0.0, 1.0, 20):
        ids = np.where(rng.random(shape) < skew, 3, rng.integers(0, E, shape)).astype(np.int32)
        ids = put(ids)
        C = ep.pick_capacity(int(np.max(counts_of(ids))), buckets)
        used.add(C)
        _, dropped = step(ids, h, ws, capacity=C)
        assert int(dropped) == 0
    assert len(used) >= 2, used                  # the routings did need different capacities
    assert len(traces) == len(used) == step._cache_size() <= len(buckets), (traces, buckets)


def test_fewer_experts_than_devices_must_divide_the_axis():
    mesh = _mesh((1, 1, 8))
    ids = np.zeros((B, T), np.int32)
    with pytest.raises(ValueError, match="multiple of E"):
        ep.ExpertParallel(mesh=mesh, capacity=8).plan(ids, 5)
    with pytest.raises(ValueError, match="multiple of E"):
        ep.dispatch_counts(ids, 5, mesh)
