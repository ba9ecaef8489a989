"""The engine's settings: ``EngineConfig`` and the KV pool's size (``--kv-cache-memory``).

    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, kv_cache_memory="512MiB")
    pages = cfg.num_pages(page_bytes_of(model, cfg.page_size))         # the pools' pages, null page included
"""

from __future__ import annotations

import dataclasses
import re

import jax

from readme_jax.errors import ConfigError
from readme_jax.model.dispatch import Dispatcher
from readme_jax.model.protocol import arch_config, is_routed

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_kv_memory(value: int | str) -> tuple[str, int]:
    """``--kv-cache-memory``: an integer (bytes), "<n>[KB|MB|GB|KiB|MiB|GiB]" or "<n>pages" -> ("bytes" |
    "pages", n). ConfigError naming the accepted forms otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return "bytes", value
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if m and int(m.group(1)) > 0 and unit in ("pages", "page"):
        return "pages", int(m.group(1))
    if m and int(m.group(1)) > 0 and unit in _UNITS:
        return "bytes", int(m.group(1)) * _UNITS[unit]
    raise ConfigError(f"kv_cache_memory: expected bytes (e.g. 536870912, 512MiB, 2GB) or pages (e.g. 4096pages), "
                      f"a positive amount, got {value!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_num_seqs: sequences decoding at once; max_num_batched_tokens: the per-step token budget (decode
    tokens + prefill tokens); max_model_len: prompt + output tokens per sequence; max_queue: requests waiting
    beyond the free slots before submit raises QueueFullError; default_max_tokens: used when a request names none;
    scheduler: a name of ``serve.schedulers.make_scheduler`` with its options; page_size: tokens per KV page;
    kv_cache_memory: the KV pools' size (``parse_kv_memory``: bytes or pages; None: every sequence at
    max_model_len, so nothing is ever preempted); prefix_caching: automatic prefix caching (vLLM's default);
    min_token_bucket: the smallest token bucket a step is padded to (8, not 16: an 8-slot decode step runs 8
    rows; its full decode steps 1.21x faster on SmolLM2 f32, 4 more programs to compile per sequence bucket
    up to 8)."""

    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256
    max_model_len: int = 2048
    max_queue: int = 64
    default_max_tokens: int = 16
    scheduler: str = "decode-first"
    scheduler_options: tuple[tuple[str, object], ...] = ()
    min_token_bucket: int = 8
    page_size: int = 16
    kv_cache_memory: int | str | None = None
    prefix_caching: bool = True
    expert_slots: int | None = None      # Read-ME: k resident experts per layer (None: all E)
    expert_policy: str = "belady"        # serve.expert_cache.POLICIES name, with its options
    expert_policy_options: tuple[tuple[str, object], ...] = ()
    belady_window: int = 8               # steps of predicted future the windowed Belady policy sees
    mesh: jax.sharding.Mesh | None = None  # parallel.mesh.make_mesh: params sharded (paged_runner.py); None: 1 device
    dispatcher: Dispatcher | None = None   # Read-ME steps' dispatcher (model.dispatch.DISPATCHERS); None: by size

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_queue",
                     "default_max_tokens", "min_token_bucket", "page_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name}: expected an integer >= 1, got {v!r}")
        if self.kv_cache_memory is not None:
            parse_kv_memory(self.kv_cache_memory)

    def num_pages(self, page_bytes: int) -> int:
        """Pages of the pools (the null page included) for ``kv_cache_memory`` at ``page_bytes`` per page.
        ConfigError when they cannot hold one sequence of max_model_len tokens."""
        per_seq = -(-(self.max_model_len + 1) // self.page_size)         # + 1: Read-ME's router lookahead
        if self.kv_cache_memory is None:
            return self.max_num_seqs * per_seq + 1
        kind, n = parse_kv_memory(self.kv_cache_memory)
        pages = n + 1 if kind == "pages" else n // page_bytes
        if pages - 1 < per_seq:
            raise ConfigError(f"kv_cache_memory={self.kv_cache_memory!r} holds {max(pages - 1, 0)} pages of "
                              f"{page_bytes} bytes; one sequence of max_model_len={self.max_model_len} needs "
                              f"{per_seq} (page_size {self.page_size})")
        return pages


def page_bytes_of(model, page_size: int) -> int:
    """Bytes of one page over the backbone's pool and (Read-ME) the router's: what sizes ``kv_cache_memory``."""
    from readme_jax.model.paged import page_bytes
    out = page_bytes(arch_config(model), page_size)
    return out + (page_bytes(model.router.config.trunk_config(), page_size) if is_routed(model) else 0)
