"""What the engine, its schedulers and the HTTP server agree on: request outputs, the per-request stream,
the scheduler's view of the queue (the engine's errors are in readme_jax/errors.py).

    stream = engine.submit(prompt_ids, SamplingParams(max_tokens=32))    # may raise QueueFullError, ...
    for out in stream: ...                                               # on a thread, blocking
    async for out in stream: ...                                         # in an event loop
    stream.cancel()                                                      # frees the slot at the next step

A scheduler sees plain snapshots (``WaitingPrefill``, ``RunningDecode``), never engine internals, so
policies are small pure classes that the trace-driven simulator runs unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import numbers
from typing import Protocol, Sequence

import numpy as np

from readme_jax.errors import SamplingError

FINISH_REASONS = ("stop", "length", "abort", "error")


def check_priority(value) -> int:
    """``value`` as vLLM's request priority (a signed 32-bit integer; lower is served first), else a
    SamplingError naming ``priority``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -2**31 <= value < 2**31:
        raise SamplingError("priority", f"expected an integer in [-2^31, 2^31) (lower is served first), got "
                                        f"{str(value)[:100]}")
    return int(value)


@dataclasses.dataclass
class RequestOutput:
    """One increment of a request. token_ids / text: new since the previous output (text is what the
    incremental detokeniser can release: bytes of a multi-byte character wait for the rest, text that
    might begin a stop string waits for the next token). The last output has finished=True and a
    finish_reason ("stop": EOS, a stop token or a stop string; "length": max_tokens or the context;
    "abort": cancelled or drained at shutdown; "error": the engine failed, see ``error``). logprobs: one
    (logprob, ((token id, logprob), ...)) per token_ids entry when the request asked for them; prompt_logprobs
    (first output only, when asked): one per prompt token, None for the first."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None


class RequestStream:
    """The consumer's end of one request: thread-safe, iterated on a thread or in an asyncio loop.

    The engine thread calls ``put``; the consumer iterates until the finished output. Memory is bounded by
    the request's own max_tokens (one output per step at most)."""

    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.finished = False

    # --- engine side ---
    def put(self, out: RequestOutput) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, out)
            except RuntimeError:          # the consumer's loop is closed: nobody is listening any more
                self._cancelled.set()
        else:
            self._q.put(out)

    # --- consumer side ---
    def cancel(self) -> None:
        """Ask the engine to stop this request; its slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("RequestStream: created for an event loop; use `async for`")
        while not self.finished:
            out = self._q.get()
            self.finished = out.finished
            yield out

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._aq is None:
            raise TypeError("RequestStream: created without an event loop; iterate it on a thread")
        while not self.finished:
            out = await self._aq.get()
            self.finished = out.finished
            yield out


# --- the scheduler's view ----------------------------------------------------------------------------------

@dataclasses.dataclass
class WaitingPrefill:
    """A request whose prompt is not fully prefilled. experts: <int32>[prompt tokens] the router's expert of
    every prompt token (known on arrival; -1 for a dense model); done: tokens already prefilled (chunked
    prefill continues in order); slot: its slot once admitted, else None (admitting needs a free slot);
    priority: vLLM's request priority (lower is served first; 0 by default)."""

    request_id: str
    arrival: int
    experts: np.ndarray
    done: int = 0
    slot: int | None = None
    priority: int = 0

    @property
    def remaining(self) -> int:
        return int(self.experts.shape[0]) - self.done


@dataclasses.dataclass
class RunningDecode:
    """A slot whose next token is known and waits to run: expert = the router's expert of that token (-1:
    dense); waited = consecutive steps it was not picked; arrival: its request's arrival step; priority: its
    request's priority (lower is served first)."""

    slot: int
    request_id: str
    arrival: int
    expert: int
    waited: int = 0
    priority: int = 0


@dataclasses.dataclass(frozen=True)
class Pick:
    """One step's work: prefills = (request_id, tokens this step) in order (a chunk continues where the
    request's prefill stopped); decodes = slots advanced by one token. Tokens in all <= the budget."""

    prefills: tuple[tuple[str, int], ...] = ()
    decodes: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler(Protocol):
    """A batching policy: chooses one step's work within ``budget`` tokens. ``free_slots``: slots a new
    prefill (``slot is None``) may take this step. Must be deterministic given its inputs and state."""

    name: str

    def pick(self, waiting: Sequence[WaitingPrefill], running: Sequence[RunningDecode], budget: int,
             free_slots: int) -> Pick: ...
