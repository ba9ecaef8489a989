"""The engine's state of one request (``serve/engine.py`` owns the requests; ``engine_pages.py`` pages them).

Dimension names: none (host-side lists of token ids).
"""

from __future__ import annotations

import dataclasses

from readme_jax.sampling import SamplingParams
from readme_jax.serve.api import RequestStream
from readme_jax.serve.detok import IncrementalDetokenizer, StopStrings


@dataclasses.dataclass
class EngineRequest:
    """One request's state in the engine: its tokens (prompt + generated), each token's expert, how much of it
    is in the KV pages, its output stream and text release."""

    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    stream: RequestStream
    arrival_time: float
    arrival_step: int = 0
    priority: int = 0                      # vLLM's: lower is admitted first, preempted last
    tokens: list[int] = dataclasses.field(default_factory=list)     # prompt + generated
    experts: list[int] = dataclasses.field(default_factory=list)    # each known token's expert (-1: unknown/dense)
    target: int = 0                        # tokens to prefill (prompt; after a preemption all but the pending)
    computed: int = 0                      # tokens whose KV is in the pages
    keys: list[bytes] | None = None         # prefix-cache keys of the target's full pages (kv_pages.py)
    slot: int | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    last_token_time: float | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    closed: bool = False                   # the final output was sent
    prompt_lps: list = dataclasses.field(default_factory=list)     # prompt logprobs so far (echo)
    follows: str | None = None             # a sibling (n > 1) whose prompt pages it waits to share

    @property
    def reads_cache(self) -> bool:
        """False: every token must be an input of the step (prompt logprobs, penalty counts, logit_bias)."""
        p = self.params
        return p.prompt_logprobs is None and not p.uses_counts and not p.logit_bias

    @property
    def device_row(self) -> bool:
        """Needs a row of the runner's processor state (a penalty or logit_bias)."""
        return self.params.uses_counts or bool(self.params.logit_bias)
