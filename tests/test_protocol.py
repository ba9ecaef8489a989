"""The model protocol (model/protocol.py): both families satisfy it; callers ask it, not hasattr."""

import pytest
from flax import nnx

from readme_jax.errors import ConfigError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from readme_jax.model.protocol import CausalLM, RoutedLM, arch_config, is_routed
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from tests.tiny_models import random_model

BASE = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=8, max_position_embeddings=64)
MOE = ReadMeConfig(base=BASE, num_experts=3, expert_dim=12,
                   router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=3, embed_rank=4,
                                       max_len=64))


def test_dense_is_a_causal_lm_not_routed():
    m = random_model(lambda rngs: Llama(BASE, rngs=rngs))
    assert isinstance(m, CausalLM) and not is_routed(m)
    assert arch_config(m) is BASE


def test_readme_is_routed_with_its_backbone_arch():
    m = random_model(lambda rngs: ReadMe(MOE, rngs=rngs))
    assert isinstance(m, RoutedLM) and is_routed(m)
    assert arch_config(m) is BASE and m.num_experts == 3


def test_not_a_model_is_a_config_error():
    with pytest.raises(ConfigError, match="not a CausalLM"):
        arch_config(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
