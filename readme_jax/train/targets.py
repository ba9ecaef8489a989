"""The router-target pool: routing-distillation targets of the frozen dense parent, computed once.

Router targets come from the frozen dense *parent*. With the fused layout the shared channels are copied
into every expert and drift apart during expert tuning, so after round 0 there is no single "dense model"
inside the MoE any more; the parent is the only well-defined teacher, and it is the one the targets of
every round are computed from. Since the parent never changes, a sequence's targets never change either:
the pipeline's ``targets`` stage runs the parent once over a fixed pool of train sequences
(:func:`build_router_pool`), and every router round samples batches (sequence + stored targets) from that
pool (:class:`PoolSampler`), running only the router. The held-out routing targets of the evaluations are
cached the same way (:func:`heldout_routing`), so an evaluation runs only the MoE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.atomic import atomic_file
from readme_jax.model.router import top1_expert
from readme_jax.nnx_jit import jit_method
from readme_jax.train import steps as steps_lib
from readme_jax.train.losses import router_targets


@dataclasses.dataclass(frozen=True)
class RouterPool:
    """The router-training sequences and their precomputed distillation targets (``extract/router_targets.npz``).

    input_ids int32[N, T]; loss_mask float32[N, T]; dist float32[N, L, T, E] (``losses.router_targets`` of
    the frozen dense parent, batch-major); domain int32[N].
    """
    input_ids: np.ndarray
    loss_mask: np.ndarray
    dist: np.ndarray
    domain: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def save(self, path: str | Path, domains: list[str]) -> None:
        """Write the pool (and the domain names) to ``path`` (.npz, atomically)."""
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, input_ids=self.input_ids.astype(np.int32), loss_mask=self.loss_mask.astype(np.float32),
                     dist=self.dist, domain=self.domain.astype(np.int32), domains=np.asarray(domains, str))

    @classmethod
    def load(cls, path: str | Path) -> RouterPool:
        with np.load(path) as z:
            return cls(input_ids=z["input_ids"], loss_mask=z["loss_mask"], dist=z["dist"].astype(np.float32),
                       domain=z["domain"])


class PoolSampler:
    """Endless batches of ``batch`` pool rows: epoch ``e`` visits the rows in the permutation of
    ``default_rng([seed, e])``; a batch may straddle two epochs. Its whole state is the number of rows drawn
    so far (``get_state() -> {"pool_position": p}``), so resuming is exact."""

    def __init__(self, pool: RouterPool, batch: int, seed: int):
        self.pool, self.batch, self.seed, self.position = pool, batch, seed, 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))}
        return self._perms[epoch]

    def indices(self, position: int, count: int) -> np.ndarray:
        n = len(self.pool)
        return np.asarray([self._perm(p // n)[p % n] for p in range(position, position + count)], np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self.indices(self.position, self.batch)
        self.position += self.batch
        p = self.pool
        return {"input_ids": p.input_ids[idx], "dist": p.dist[idx], "loss_mask": p.loss_mask[idx],
                "domain": p.domain[idx]}

    def get_state(self) -> dict:
        return {"pool_position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["pool_position"])


def build_router_pool(dense, specific: np.ndarray, sequences: list[dict[str, np.ndarray]], domain: np.ndarray, *,
                      batch: int, dtype: str = "float32", use_abs: bool = True,
                      progress: bool = True) -> RouterPool:
    """Run the dense parent once over ``sequences`` and keep their distillation targets.

    Args:
      dense: the dense parent (:class:`readme_jax.model.llama.Llama`), frozen.
      specific: <bool>[E, L, F] expert-specific channel masks (``ExpertMasks.specific``).
      sequences: N packed sequences ``{"input_ids": int[T], "loss_mask": float[T]}``.
      domain: int[N] domain index of each sequence.
      batch: sequences per dense forward; dtype: compute dtype (``train.dtype``, the one the router step
        used when it made targets itself); use_abs: ``train.target_abs``.
    Returns:
      the :class:`RouterPool`, ``dist`` float32[N, L, T, E].
    """
    ids = np.stack([s["input_ids"] for s in sequences])
    specific = jnp.asarray(specific)
    targets = jit_method(dense, lambda m, ids: jnp.swapaxes(router_targets(m, ids, None, specific, use_abs=use_abs),
                                                            0, 1),                          # [B, L, T, E]
                         graphdef=None if dtype == "float32" else steps_lib.compute_graphdef(dense, dtype))
    dist = [np.asarray(targets(jnp.asarray(ids[i:i + batch])), np.float32)
            for i in tqdm(range(0, len(ids), batch), desc="targets", unit="batch", disable=not progress)]
    return RouterPool(input_ids=ids.astype(np.int32),
                      loss_mask=np.stack([s["loss_mask"] for s in sequences]).astype(np.float32),
                      dist=np.concatenate(dist), domain=np.asarray(domain, np.int32))


def heldout_routing(path: str | Path, windows: dict[str, np.ndarray], dense, specific: np.ndarray, *,
                    batch: int, use_abs: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{domain: (windows int32[W, T], target expert int32[W, T])}`` of the held-out routing windows.

    The target of a token is :func:`~readme_jax.model.router.top1_expert` of the dense parent's
    layer-summed distillation targets. Cached in ``path`` (.npz); recomputed (once, with ``dense``) when
    the cache is missing or holds other windows.
    """
    path = Path(path)
    if path.is_file():
        with np.load(path) as z:
            names = [str(x) for x in z["domains"]]
            if names == list(windows) and all(
                    np.array_equal(z[f"inputs_{i}"], windows[d]) for i, d in enumerate(names)):
                return {d: (windows[d], z[f"target_{i}"]) for i, d in enumerate(names)}
    specific = jnp.asarray(specific)
    target = jit_method(dense, lambda m, ids: top1_expert(jnp.sum(router_targets(m, ids, None, specific,
                                                                                 use_abs=use_abs), 0)))

    out, arrays = {}, {"domains": np.asarray(list(windows), str)}
    for i, (d, inputs) in enumerate(windows.items()):
        tgt = np.concatenate([np.asarray(target(jnp.asarray(inputs[j:j + batch])))
                              for j in range(0, len(inputs), batch)])
        out[d] = (inputs, tgt)
        arrays[f"inputs_{i}"], arrays[f"target_{i}"] = inputs, tgt
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return out
