"""Routing metrics (accuracy, locality, load) against hand counts, the router's choice through top1_expert,
and the closing summary table."""

from __future__ import annotations

import numpy as np
import pytest

from readme_jax.eval.routing import route_windows, routing_locality, routing_metrics, summary_table


def test_routing_locality_counts():
    ids = np.array([[0, 0, 1, 1, 1], [2, 0, 2, 2, 0]])
    assert routing_locality(ids) == (4, 8)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    assert routing_locality(ids, mask) == (3, 7)


def test_routing_metrics_match_hand_counts():
    routed = {"a": np.array([[0, 0, 1, 1]]), "b": np.array([[2, 2, 2, 0], [1, 1, 2, 2]])}
    target = {"a": np.array([[0, 1, 1, 1]]), "b": np.array([[2, 2, 0, 0], [0, 1, 2, 2]])}
    m = routing_metrics({d: (routed[d], target[d]) for d in routed}, num_experts=3)
    assert m["router_accuracy_by_domain"] == {"a": 3 / 4, "b": 6 / 8}
    assert m["router_accuracy"] == 9 / 12 and m["routing_tokens"] == 12
    assert m["locality_by_domain"] == {"a": 2 / 3, "b": 4 / 6} and m["locality"] == 6 / 9
    assert m["load"] == {"a": [0.5, 0.5, 0.0], "b": [1 / 8, 2 / 8, 5 / 8]}
    with pytest.raises(ValueError, match=r"domain 'a': routed ids \(1, 4\) and targets \(1, 3\)"):
        routing_metrics({"a": (routed["a"], target["a"][:, :3])}, num_experts=3)


def test_route_windows_is_the_argmax_of_the_router_logits_in_batches():
    from flax import nnx

    from readme_jax.model.router import Router, RouterConfig
    router = Router(RouterConfig(vocab_size=32, num_experts=4, dim=16, n_heads=2, mlp_dim=32, embed_rank=8),
                    rngs=nnx.Rngs(0))
    windows = np.random.default_rng(0).integers(0, 32, size=(5, 12)).astype(np.int32)
    got = route_windows(router, windows, batch=2)                      # batches of 2, 2, 1 rows
    assert got.dtype == np.int32 and got.shape == (5, 12)
    np.testing.assert_array_equal(got, np.asarray(router(windows)).argmax(-1))


def test_summary_table_orders_columns_and_marks_missing_metrics():
    ppl = lambda x: {"alpha": {"ppl": x}, "beta": {"ppl": 2 * x}}   # noqa: E731
    evals = {"final": {"ppl": ppl(3.0), "router_accuracy": 0.75, "locality": 0.5},
             "dense": {"ppl": ppl(1.0)}, "expert_0": {"ppl": ppl(9.0)}}
    lines = summary_table(evals).splitlines()
    assert lines[1].split() == ["domain", "dense", "parent", "MoE", "final"]      # expert_0 is not a column
    assert lines[2].split() == ["alpha", "1.000", "3.000"] and lines[3].split() == ["beta", "2.000", "6.000"]
    assert lines[4].split() == ["router", "accuracy", "-", "0.750"]
    assert lines[5].split() == ["routing", "locality", "-", "0.500"]
