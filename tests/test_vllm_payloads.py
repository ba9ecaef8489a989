"""vLLM's benchmark client against our server, without vLLM: the exact request bodies vllm 0.32's request
functions send (recorded by ``tests/fixtures/vllm_payloads/capture.py``; see the README there) are posted to
a live server on a tiny model, and each must stream a complete answer: 200, every event valid JSON with no
error, ``max_tokens`` tokens (the payloads carry ``ignore_eos``), a usage chunk, ``[DONE]``. (The default
completions payload carries ``repetition_penalty: 1.0``, refused with a 400 before issue 18's server work.)"""

import json
from pathlib import Path

import httpx
import pytest

from tests.test_server import MODEL, Served, byte_tokenizer, make_engine

pytestmark = pytest.mark.slow(reason="starts a server whose engine warms up (compiles every bucket)")

FIXTURES = Path(__file__).parent / "fixtures" / "vllm_payloads"
PAYLOADS = ("openai", "openai-chat", "openai-chat-benchmark")


@pytest.fixture(scope="module")
def served():
    tok = byte_tokenizer()
    s = Served(*make_engine(tok, max_num_seqs=2, max_queue=4), tok)
    yield s
    s.stop()


def test_fixtures_are_what_vllm_sent():
    """The recorded bodies are vllm 0.32's, for the model the server below serves."""
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(PAYLOADS)
    for path in FIXTURES.glob("*.json"):
        rec = json.loads(path.read_text())
        assert rec["vllm"] == "0.32.0" and rec["method"] == "POST" and rec["content_type"] == "application/json"
        assert rec["body"]["model"] == MODEL and rec["body"]["stream"] is True
        assert rec["path"] == ("/v1/chat/completions" if "messages" in rec["body"] else "/v1/completions")


@pytest.mark.parametrize("name", PAYLOADS)
def test_vllm_client_payload_is_served(served, name):
    rec = json.loads((FIXTURES / f"{name}.json").read_text())
    body = rec["body"]
    want = body.get("max_completion_tokens") or body["max_tokens"]
    events, usage = [], None
    with httpx.stream(rec["method"], served.base + rec["path"], content=json.dumps(body).encode(),
                      headers={"Content-Type": rec["content_type"]}, timeout=120) as r:
        if r.status_code != 200:
            pytest.fail(f"{name}: HTTP {r.status_code}: {r.read().decode()[:300]}")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines and lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        event = json.loads(line[len("data: "):])
        assert "error" not in event, event
        events.append(event)
        usage = event.get("usage") or usage
    assert usage is not None and usage["completion_tokens"] == want
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]
