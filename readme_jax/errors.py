"""The project's error types, one per concept; every module raises these instead of defining its own.

Messages are one line that names the file, key or tensor, what was expected and what was found.
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written, e.g. ``model.safetensors: tensor
    model.layers.0.self_attn.q_proj.weight has shape [64, 32], expected [32, 32]``."""


class ConfigError(ValueError):
    """A config file, key or value is invalid (the message names the key, the value and what is expected)."""


class SamplingError(ValueError):
    """A sampling parameter is out of range. ``param`` names the field (the server's 400 reports it)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
