"""The project's error types, one per concept; every module of the package raises these (or a builtin for a
programming error: a wrong argument type or shape in a call) and none defines its own. (The benchmarks, outside
the package, have their own: a variant or breakdown that fails becomes an error row of their table.)

Messages are one line that names the file, key or tensor, what was expected and what was found. Errors of
bad input subclass ValueError (callers catch ValueError); errors of state or environment subclass
RuntimeError. The same mistake is the same type everywhere: an unknown name or a bad option of a config,
registry or CLI is :class:`ConfigError`.
"""

from __future__ import annotations

from typing import Any


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


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (and line) at fault."""


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or malformed (the message names the file)."""


class AssetError(RuntimeError):
    """A pinned download failed or did not match its checksum."""


class PipelineError(RuntimeError):
    """A stage cannot run (missing input, bad data); the message says what and where."""


class StaleRunError(RuntimeError):
    """The config changes settings that finished or half-finished training stages were made with."""


class RunLockError(RuntimeError):
    """The run folder is held by another run, or cannot be locked; the message names the folder."""


class TrainingDivergedError(RuntimeError):
    """A train step produced a non-finite loss, gradient or update; nothing of that step was kept."""


class EngineError(RuntimeError):
    """The engine failed (its thread died) or was shut down: the server answers 500 / 503."""


class QueueFullError(RuntimeError):
    """The bounded request queue is full: the server answers 429 with Retry-After."""


class NotReadyError(RuntimeError):
    """The engine is not accepting requests (starting, draining, or failed): the server answers 503."""


class APIError(Exception):
    """An error answered in OpenAI's shape. ``param``: the request field at fault (None if none)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
