"""Checks of the whole run config at load time, before any stage runs or ``config.yaml`` is written.

    FIELD_CHECKS       ranges of the fields the model's own config classes leave unchecked (``router.*`` is
                       :class:`~readme_jax.model.router.RouterConfig`, ``model.random.*`` /
                       ``model.architecture.*`` a :class:`~readme_jax.model.config.LlamaConfig`); the loader
                       runs them before building
    check_config(cfg)  cross-field checks: the sequence lengths fit the models' contexts, the keep ratio
                       leaves each expert channels of its own
    check_domain_names  corpus.domains / extract.num_experts against the domains a corpus has

Each failure is one :class:`~readme_jax.errors.ConfigError` naming the key, its value and what is expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

from readme_jax.errors import ConfigError


def _positive_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {v!r}")


def _positive_number(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{key}: expected a finite number > 0, got {v!r}")


def _float_dtype(key: str, v: Any) -> None:
    if v not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{key}: expected one of ['float32', 'bfloat16', 'float16'], got {v!r}")


def _folder_name(key: str, v: Any) -> None:
    if not v or "/" in v or "\\" in v or v in (".", ".."):
        raise ConfigError(f"{key}: expected a non-empty name usable as a folder (runs/<name>), got {v!r}")


FIELD_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "name": _folder_name,
    **{f"router.{k}": _positive_int for k in ("dim", "n_layers", "n_heads", "mlp_dim", "max_len")},
    **{f"router.{k}": _positive_number for k in ("rope_theta", "rms_norm_eps")},
    **{f"router.{k}": _float_dtype for k in ("dtype", "param_dtype")},
    **{f"model.{s}.{k}": _positive_int for s in ("random", "architecture")
       for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings", "sliding_window")},
    **{f"model.{s}.{k}": _positive_number for s in ("random", "architecture") for k in ("rope_theta", "rms_norm_eps")},
}


def check_keep_ratio(keep_ratio: float, ffn_dim: int | None) -> None:
    """Each expert keeps round(keep_ratio * F) of the F channels per layer; its own channels are those not
    every domain keeps, so keeping all of them (or none) leaves it none. ``ffn_dim`` None: F unknown yet."""
    if keep_ratio >= 1.0:
        raise ConfigError(f"extract.keep_ratio={keep_ratio}: every expert would keep every FFN channel, so no "
                          "expert has channels of its own (expected a value in (0, 1), e.g. 0.5)")
    if ffn_dim is not None:
        k = int(round(keep_ratio * ffn_dim))
        if not 1 <= k < ffn_dim:
            raise ConfigError(f"extract.keep_ratio={keep_ratio} keeps {k} of the F={ffn_dim} FFN channels per "
                              f"layer; expected between 1 and {ffn_dim - 1} so each expert has channels of its own "
                              f"(keep_ratio in [{1 / ffn_dim:.3g}, {(ffn_dim - 1) / ffn_dim:.3g}])")


def check_seq_lens(cfg, max_positions: int | None) -> None:
    """train.seq_len, eval.seq_len and extract.calib_seq_len fit the router's router.max_len and the dense
    model's context ``max_positions`` (None: not known yet)."""
    limits = [("router.max_len", cfg.router.max_len)]
    if max_positions is not None:
        limits.append(("the dense model's context (max_position_embeddings)", max_positions))
    for key, value in (("train.seq_len", cfg.train.seq_len), ("eval.seq_len", cfg.eval.seq_len),
                       ("extract.calib_seq_len", cfg.extract.calib_seq_len)):
        for what, limit in limits:
            if value > limit:
                raise ConfigError(f"{key}={value} is longer than {what} = {limit}")


def check_config(cfg) -> None:
    """The cross-field checks that need only the config (the run folder's environment is checked by the
    pipeline before its first stage)."""
    rnd = cfg.model.random if cfg.model.source == "random-tiny" else cfg.model.architecture
    check_keep_ratio(cfg.extract.keep_ratio, rnd.intermediate_size if rnd else None)
    check_seq_lens(cfg, rnd.max_position_embeddings if rnd else None)


def check_domain_names(cfg, available, where: str) -> None:
    """corpus.domains is a subset of ``available`` (the domains of ``where``) and the domains used match
    extract.num_experts (:meth:`~readme_jax.config.run.Config.check_domains`); the pipeline calls it once it
    knows the corpus's domains, before any stage."""
    wanted = list(cfg.corpus.domains) if cfg.corpus.domains else list(available)
    unknown = [d for d in wanted if d not in available]
    if unknown:
        raise ConfigError(f"corpus.domains={list(cfg.corpus.domains)}: unknown domain(s) {unknown}; "
                          f"{where} has {list(available)}")
    cfg.check_domains(wanted)
