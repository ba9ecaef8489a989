"""Typed run configuration: frozen dataclasses per concern, YAML files in ``configs/``, dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.rounds=3", "eval.max_tokens=2048"])
    cfg.train.router_lr                      # 5e-4
    cfg.router                               # a RouterConfig (vocab_size / num_experts: set by the pipeline)
    cfg.to_dict()                            # the resolved config, as written to <run_dir>/config.yaml

:mod:`.loader` is the generic YAML -> dataclass machinery, :mod:`.sections` the run's sections,
:mod:`.run` the whole config and :func:`load_config`. Errors are :class:`readme_jax.errors.ConfigError`.
"""

from readme_jax.config.run import CONFIG_DIR, SECTIONS, Config, load_config
from readme_jax.config.sections import (CorpusConfig, EvalConfig, ExtractConfig, MeshConfig, ModelConfig,
                                        TrainConfig)

__all__ = ["CONFIG_DIR", "SECTIONS", "Config", "load_config", "CorpusConfig", "EvalConfig", "ExtractConfig",
           "MeshConfig", "ModelConfig", "TrainConfig"]
