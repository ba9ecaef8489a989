"""The resident expert pool: the decode step computes only on experts held in k slots per layer.

    pool = ResidentPool(model.experts.arrays(), capacity=k)      # slow copy of every expert + empty fast pool
    pool.sync(cache.resident)                                    # make the fast pool hold the cache's experts
    slot_ids = pool.remap(expert_ids)                            # expert id -> its slot (-1: not resident)

Routing is shared by every layer, so every layer's cache holds the same experts and one slot map serves all
L layers: slot j holds the same expert at every layer. Fast pool: ``w_gate``/``w_up`` [L, k, D, Fe] and
``w_down`` [L, k, Fe, D], preallocated once; a load copies one expert's [L, D, Fe] weights into slot j in
place (a jitted, donated update), so a decode step with fewer distinct experts moves and reads fewer bytes.
Slow pool: every expert's weights, one array per expert and weight, in host memory (memory kind
``pinned_host``, where the backend has it: GPU/TPU) and copied to the device asynchronously on a load; on CPU
both pools live in RAM and the same code runs. Which experts to hold is the expert cache's decision
(``serve/expert_cache.py``: the policy picks victims); this module only makes the memory match it.

Dimension names: L layers, E experts, k resident slots, D model, Fe expert width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.errors import ConfigError

EXPERT_KEYS = ("w_gate", "w_up", "w_down")


def slow_memory(device=None) -> jax.sharding.Sharding:
    """Where the slow pool lives: the device's pinned host memory where the backend has one, else the device."""
    device = device or jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    kind = "pinned_host" if device.platform != "cpu" and "pinned_host" in kinds else None
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


@functools.partial(jax.jit, donate_argnums=(0,))
def _load(pool: dict, weights: dict, slot) -> dict:
    """pool w [L, k, ...] with slot ``slot`` <int32>[] overwritten by weights w [L, ...]; in place (donated)."""
    return {k: jax.lax.dynamic_update_index_in_dim(pool[k], weights[k].astype(pool[k].dtype), slot, axis=1)
            for k in EXPERT_KEYS}


class ResidentPool:
    """See the module docstring. ``experts``: w_gate/w_up [L, E, D, Fe], w_down [L, E, Fe, D]."""

    def __init__(self, experts: dict, capacity: int):
        L, E = experts["w_gate"].shape[:2]
        if not 1 <= capacity <= E:
            raise ConfigError(f"ResidentPool: capacity must be in [1, {E}] experts per layer, got {capacity}")
        self.num_layers, self.num_experts, self.capacity = L, E, capacity
        host = slow_memory()
        self.slow = [{k: jax.device_put(experts[k][:, e], host) for k in EXPERT_KEYS} for e in range(E)]
        self.fast = {k: jnp.zeros((L, capacity) + experts[k].shape[2:], experts[k].dtype) for k in EXPERT_KEYS}
        self.device = jax.devices()[0]
        self.slot_of: dict[int, int] = {}
        self.loads = 0
        self.expert_bytes = sum(int(np.prod(experts[k].shape[:1] + experts[k].shape[2:])) * experts[k].dtype.itemsize
                                for k in EXPERT_KEYS)

    def sync(self, resident) -> list[int]:
        """Load the experts of ``resident`` (at most k ids) that are not in a slot, into the slots of the ones
        that left (or empty slots). Returns the experts loaded."""
        resident = {int(e) for e in resident}
        if len(resident) > self.capacity:
            raise ValueError(f"ResidentPool.sync: {len(resident)} experts for {self.capacity} slots")
        for e in [e for e in self.slot_of if e not in resident]:
            del self.slot_of[e]
        free = sorted(set(range(self.capacity)) - set(self.slot_of.values()))
        loaded = sorted(resident - set(self.slot_of))
        for e, j in zip(loaded, free):
            weights = jax.device_put(self.slow[e], self.device)          # async host -> device copy
            self.fast = _load(self.fast, weights, jnp.int32(j))
            self.slot_of[e] = j
        self.loads += len(loaded)
        return loaded

    def remap(self, expert_ids) -> list[int]:
        """Expert ids -> slot ids (-1 for an id with no slot: its token gets no expert)."""
        return [self.slot_of.get(int(e), -1) for e in expert_ids]
