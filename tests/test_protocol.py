"""The model protocol (model/protocol.py): both families satisfy it; callers ask it, not hasattr."""

import pytest
from flax import nnx

from readme_jax.errors import ConfigError
from readme_jax.model.protocol import CausalLM, RoutedLM, arch_config, is_routed
from tests.tiny_models import TINY_DENSE, TINY_READ_ME


def test_dense_is_a_causal_lm_not_routed(tiny_dense):
    assert isinstance(tiny_dense, CausalLM) and not is_routed(tiny_dense)
    assert arch_config(tiny_dense) is TINY_DENSE


def test_readme_is_routed_with_its_backbone_arch(tiny_readme):
    assert isinstance(tiny_readme, RoutedLM) and is_routed(tiny_readme)
    assert arch_config(tiny_readme) is TINY_READ_ME.base and tiny_readme.num_experts == TINY_READ_ME.num_experts


def test_not_a_model_is_a_config_error():
    with pytest.raises(ConfigError, match="not a CausalLM"):
        arch_config(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
