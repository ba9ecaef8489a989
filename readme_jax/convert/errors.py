"""The one error type of the converters: a checkpoint file is missing, malformed or unsupported."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written.

    The message is one line that names the file and the tensor or field, and says what was expected and
    what was found, e.g. ``model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has shape
    [64, 32], expected [32, 32]``.
    """
