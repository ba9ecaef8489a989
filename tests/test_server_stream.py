"""Chat streaming order: the role chunk goes out with the engine's first output (just before the first
token's text), not at submission, so a client's time to first chunk measures the prefill."""

import asyncio
import json

from readme_jax.sampling import SamplingParams
from readme_jax.serve.api import RequestOutput, RequestStream
from readme_jax.serve.protocol import GenerationRequest
from readme_jax.serve.choices import events as _events


def test_role_chunk_waits_for_the_first_token():
    async def run():
        req = GenerationRequest("chat", "tiny", [[1, 2, 3]], 1, SamplingParams(max_tokens=2), True, False)
        stream = RequestStream("r0", 3, loop=asyncio.get_running_loop())
        events = _events(req, [stream], "r0", 0, lambda: None, tokenizer=None)
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.05)
        assert not first.done()                                  # nothing before the engine's first output
        stream.put(RequestOutput("r0", [7], "hi"))
        role = json.loads((await first).decode()[len("data: "):])
        text = json.loads((await anext(events)).decode()[len("data: "):])
        stream.put(RequestOutput("r0", [8], "!", finished=True, finish_reason="length"))
        rest = [e async for e in events]
        return role, text, rest

    role, text, rest = asyncio.run(run())
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["choices"][0]["delta"]["content"] == "hi"
    assert len(rest) == 2 and rest[-1] == b"data: [DONE]\n\n"
