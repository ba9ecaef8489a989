"""An expert update's throughput in the metrics: model TFLOP/s and MFU against a matmul peak measured
once per process.

    tp = Throughput.of(model, seq_len=512, dtype="float32", devices=mesh.devices.size)
    record.update(tp.of_step(tokens=2048, seconds=16.9))   # {"tflops", "mfu"}

Model FLOPs per token follow PaLM's accounting (Chowdhery et al. 2022, appendix B): 6 N for the forward and
backward matmuls, N the parameters one token uses (``ReadMe.active_params``: the backbone, its one expert and the
router; the tied embedding counted once, as the LM head), plus 12 L H Q T for attention (L layers, H heads, Q head
dim, T sequence length). MFU is that rate over the peak: a [2048, 2048] x [2048, 2048] matmul of the training
dtype in XLA on one device, the best of 3, times the mesh's devices off CPU (simulated CPU devices share the
same cores). Work that is not model FLOPs (recomputed activations, distillation's teacher forward) lowers MFU.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

PEAK_N = 2048


@functools.cache
def matmul_peak(dtype: str = "float32", n: int = PEAK_N) -> float:
    """FLOP/s of the best of 3 jitted [n, n] x [n, n] matmuls of ``dtype`` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(active_params: int, *, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM's training FLOPs per token: 6 N + 12 L H Q T."""
    return 6.0 * active_params + 12.0 * layers * heads * head_dim * seq_len


@dataclasses.dataclass(frozen=True)
class Throughput:
    flops_per_token: float
    peak: float                     # FLOP/s of the devices the update runs on

    @classmethod
    def of(cls, model, *, seq_len: int, dtype: str, devices: int) -> "Throughput":
        """``model`` a ReadMe (``active_params``, ``arch``)."""
        a = model.arch
        fpt = flops_per_token(model.active_params(), layers=a.num_layers, heads=a.num_heads,
                              head_dim=a.head_dim, seq_len=seq_len)
        scale = 1 if jax.default_backend() == "cpu" else devices
        return cls(fpt, matmul_peak(dtype) * scale)

    def of_step(self, *, tokens: int, seconds: float) -> dict[str, float]:
        """The metrics of one update of ``tokens`` tokens that took ``seconds``."""
        rate = self.flops_per_token * tokens / max(seconds, 1e-9)
        return {"tflops": float(f"{rate / 1e12:.4g}"), "mfu": float(f"{rate / self.peak:.4g}")}


#: The fields of a step record that come from the wall clock (a resumed run's records equal an uninterrupted
#: run's without them).
WALL_CLOCK_KEYS = ("seconds", "tokens_per_s", "tflops", "mfu")
