"""Routing metrics of a Read-ME router on held-out windows, and the closing table of a run.

    routed = route_windows(model.router, windows, batch=4)          # int32[W, T] expert per token
    metrics = routing_metrics({d: (routed_d, target_d) ...}, num_experts=E)
    print(summary_table({"dense": ..., "router_0": ..., "final": ...}))

* router accuracy: share of tokens whose routed expert (:func:`readme_jax.model.router.top1_expert` of the
  router logits) equals the target expert (the argmax over experts of the dense parent's layer-summed
  distillation targets, computed once by the pipeline's ``targets`` stage);
* locality: share of tokens (with a previous token) routed to the same expert as the previous token, the
  property the serving stack's expert prefetch relies on (the paper reports 71%);
* load: per domain, the share of its tokens sent to each expert.

The per-domain perplexity next to these numbers comes from :mod:`readme_jax.eval.perplexity`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.model.router import top1_expert
from readme_jax.nnx_jit import jit_method

SUMMARY_COLUMNS = {"dense": "dense parent", "router_0": "MoE router_0", "final": "MoE final"}


def routing_locality(expert_ids, token_mask=None) -> tuple[int, int]:
    """(tokens whose expert equals the previous token's, tokens with a previous token), both masked.

    expert_ids <int>[B, T]; token_mask <bool>[B, T] or None. Counted on the host (NumPy).
    """
    ids = np.asarray(expert_ids)
    m = np.ones(ids.shape, bool) if token_mask is None else np.asarray(token_mask, bool)
    pair = m[:, 1:] & m[:, :-1]
    same = (ids[:, 1:] == ids[:, :-1]) & pair
    return int(same.sum()), int(pair.sum())


def route_windows(router: nnx.Module, windows: np.ndarray, *, batch: int) -> np.ndarray:
    """The router's expert choice for every token of ``windows`` int32[W, T] -> int32[W, T], in batches of
    ``batch`` rows (the router's weights are a traced argument of one jitted call)."""
    route = jit_method(router, lambda r, ids: top1_expert(r(ids)))
    return np.concatenate([np.asarray(route(jnp.asarray(windows[i:i + batch])))
                           for i in range(0, len(windows), batch)])


def routing_metrics(routed_and_targets: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                    num_experts: int) -> dict:
    """Router accuracy, locality and load, per domain and over all tokens.

    Args:
      routed_and_targets: ``{domain: (routed int[W, T], target int[W, T])}`` expert ids per token.
      num_experts: E (the length of each load vector).
    Returns:
      ``{router_accuracy, locality, router_accuracy_by_domain, locality_by_domain, load {domain: [E]},
      routing_tokens}`` (plain Python numbers, JSON-ready).
    """
    acc, loc, load = {}, {}, {}
    hits = total = same = pairs = 0
    for d, (routed, target) in routed_and_targets.items():
        routed, target = np.asarray(routed), np.asarray(target)
        if routed.shape != target.shape:
            raise ValueError(f"domain {d!r}: routed ids {routed.shape} and targets {target.shape} differ in shape")
        h, n = int((routed == target).sum()), routed.size
        s, p = routing_locality(routed)
        acc[d], loc[d] = h / n, s / max(p, 1)
        load[d] = (np.bincount(routed.ravel(), minlength=num_experts) / n).tolist()
        hits, total, same, pairs = hits + h, total + n, same + s, pairs + p
    return {"router_accuracy": hits / total, "locality": same / max(pairs, 1), "router_accuracy_by_domain": acc,
            "locality_by_domain": loc, "load": load, "routing_tokens": total}


def summary_table(evals: Mapping[str, dict]) -> str:
    """The closing table of a run: per-domain perplexity of each evaluation in ``evals`` (tags of
    :data:`SUMMARY_COLUMNS`, in that order; others are ignored), then router accuracy and locality."""
    cols = [t for t in SUMMARY_COLUMNS if t in evals]
    rows = [f"{'domain':<14}" + "".join(f"{SUMMARY_COLUMNS[c]:>15}" for c in cols)]
    domains = list(evals[cols[0]]["ppl"]) if cols else []
    for d in domains:
        rows.append(f"{d:<14}" + "".join(f"{evals[c]['ppl'][d]['ppl']:>15.3f}" for c in cols))
    for key, label in (("router_accuracy", "router accuracy"), ("locality", "routing locality")):
        rows.append(f"{label:<14}" + "".join(
            f"{evals[c][key]:>15.3f}" if key in evals[c] else f"{'-':>15}" for c in cols))
    return "held-out perplexity (per domain) and routing metrics\n" + "\n".join(rows)
