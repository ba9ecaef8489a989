"""The OpenAI-compatible server on a tiny random model: a real uvicorn server on a free 127.0.0.1 port (one
per module, a second for the injected engine failure) and the real ``openai`` client; SIGTERM drain in a
subprocess. The tokenizer is byte-level BPE without merges, so every multi-byte character is split across
tokens and the incremental detokeniser is exercised on every request."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from benchmarks.serve_load import wait_ready
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from readme_jax.serve.engine import Engine, EngineConfig
from readme_jax.serve.metrics import EngineMetrics
from readme_jax.serve.server import create_app, uvicorn_config
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="starts a server whose engine warms up (compiles every bucket)")

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CFG = LlamaConfig(vocab_size=len(SPECIALS) + 256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256)
MODEL = "tiny"
KEY = "test-key"
LONG = {"ignore_eos": True}            # extra_body: run to max_tokens whatever the random model samples


def byte_tokenizer():
    """Byte-level BPE with no merges (one token per byte) and ChatML specials, as a project Tokenizer."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    from readme_jax.data.tokenizers.bpe import BPETokenizer, byte_alphabet

    alphabet = byte_alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {alphabet[b]: len(SPECIALS) + b for b in range(256)}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return BPETokenizer(backend, bos_id=1, eos_id=2, pad_id=0, chat_template=CHATML)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


class Served:
    """A uvicorn server for ``engine`` on a free port, run on a thread."""

    def __init__(self, engine, metrics, tokenizer, *, api_key=None, max_model_len=CFG.max_position_embeddings):
        self.engine, self.metrics = engine, metrics
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, tokenizer, model_name=MODEL, max_model_len=max_model_len, default_max_tokens=8,
                         api_key=api_key, metrics=self.metrics)
        self.server = uvicorn.Server(uvicorn_config(app, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.base)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key or "none", max_retries=0,
                                    timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


def make_engine(tokenizer, *, fault_hook=None, **cfg):
    model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)
    metrics = EngineMetrics()
    config = EngineConfig(**({"max_num_seqs": 2, "max_num_batched_tokens": 16, "max_model_len": 256,
                              "max_queue": 4, "default_max_tokens": 8, "scheduler": "decode-first"} | cfg))
    return Engine(model, tokenizer, config, metrics=metrics, fault_hook=fault_hook), metrics


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    s = Served(*make_engine(tok), tok, api_key=KEY)
    yield s
    s.stop()


def test_completion(served):
    out = served.client.completions.create(model=MODEL, prompt="Héllo wörld 😀", max_tokens=12, temperature=0,
                                           extra_body=LONG)
    assert out.object == "text_completion" and out.model == MODEL
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len("Héllo wörld 😀".encode()), 12)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    again = served.client.completions.create(model=MODEL, prompt="Héllo wörld 😀", max_tokens=12, temperature=0,
                                             extra_body=LONG)
    assert again.choices[0].text == choice.text                 # greedy is deterministic
    ids = served.client.completions.create(model=MODEL, prompt=[40, 50, 60], max_tokens=3, extra_body=LONG)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_chat(served, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüß dich! 東京?"}]
    out = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                extra_body=LONG)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 6
    # Seeded sampling is reproducible.
    a, b = (served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=1.0,
                                                  top_p=0.9, seed=5, extra_body=LONG) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_equals_non_streamed(served):
    kw = dict(model=MODEL, prompt="ça va? 👍🏽", max_tokens=20, temperature=0, extra_body=LONG)
    full = served.client.completions.create(**kw).choices[0].text
    chunks = list(served.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20

    messages = [{"role": "user", "content": "hi"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body=LONG)
    full = served.client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(served.client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None

    # The wire format itself: SSE events, the usage chunk, then [DONE].
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(f"{served.base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"), ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"), ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"), ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": -3}, "seed"), ({"prompt": "x", "frobnicate": 1}, "frobnicate"), ({}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"prompt": [1, 2, 999]}, "prompt"), ({"prompt": "x" * 300}, "prompt"),
    ({"prompt": "x" * 250, "max_tokens": 10}, "max_tokens"), ({"prompt": "x", "stream_options": {}}, "stream_options"),
    ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": 1.5}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_bad_completion_names_the_field(served, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.post("/completions", body={"model": MODEL, **body}, cast_to=object)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert set(e.value.body) == {"message", "type", "param", "code"} and param in e.value.body["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": 1}, "echo"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
])
def test_bad_chat_names_the_field(served, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.post("/chat/completions", body={"model": MODEL, **body}, cast_to=object)
    assert e.value.body["param"] == param


# What vLLM's benchmark client sends (default "openai" completions backend, and "openai-chat"): every sampling
# field a client leaves at its neutral value is accepted.
VLLM_BENCH_COMPLETION = {"model": MODEL, "prompt": "bench", "repetition_penalty": 1.0, "max_tokens": 3, "logprobs": None,
                         "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
VLLM_BENCH_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "bench"}]}],
                   "temperature": 0.0, "max_completion_tokens": 3, "stream": True,
                   "stream_options": {"include_usage": True}, "ignore_eos": True}
NEUTRAL = {"top_k": -1, "min_p": 0.0, "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1,
           "logit_bias": {}, "n": 1, "best_of": 1, "echo": False, "min_tokens": 0, "use_beam_search": False,
           "skip_special_tokens": True, "include_stop_str_in_output": False, "top_logprobs": 0, "priority": 0}


def _post(served, route, body, **kw):
    return httpx.post(f"{served.base}/v1/{route}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      **kw)


def test_neutral_fields_are_accepted_and_every_processor_is_served(served):
    for route, body in (("completions", VLLM_BENCH_COMPLETION), ("chat/completions", VLLM_BENCH_CHAT)):
        r = _post(served, route, body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        assert json.loads(r.text.split("\n\n")[-3][6:])["usage"]["completion_tokens"] == 3
    plain = _post(served, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 6, "temperature": 0,
                                          "ignore_eos": True})
    r = _post(served, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 6, "temperature": 0,
                                      "ignore_eos": True, **NEUTRAL})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"], r.text
    for field, value in (("top_k", 5), ("min_p", 0.1), ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                         ("repetition_penalty", 1.2), ("logit_bias", {"7": 3}), ("logprobs", 1), ("logprobs", 0),
                         ("echo", True)):
        r = _post(served, "completions", {"model": MODEL, "prompt": "x", field: value})
        assert r.status_code == 200, r.text
    for field, value in (("top_k", -2), ("min_p", 2), ("repetition_penalty", 0), ("logit_bias", {"x": 1})):
        err = _post(served, "completions", {"model": MODEL, "prompt": "x", field: value}).json()["error"]
        assert err["param"] == field, err
    r = _post(served, "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                           "logprobs": True, "top_logprobs": 2, "max_tokens": 3, "ignore_eos": True})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert r.status_code == 200 and len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)


def test_chat_echo_starts_each_choice_with_the_last_assistant_message(served):
    """vLLM's chat ``echo``: each choice's content starts with the last message's when it is the assistant's
    (streamed: a chunk right after the role); after a user message it adds nothing."""
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hé"},
                                                                                {"type": "text", "text": "llo"}]}]
    kw = dict(model=MODEL, messages=said, max_tokens=4, temperature=0, extra_body=LONG)
    plain = served.client.chat.completions.create(**kw).choices[0].message.content
    echoed = served.client.chat.completions.create(**{**kw, "extra_body": {**LONG, "echo": True}}, n=2)
    assert [c.message.content for c in echoed.choices] == ["Hé\nllo" + plain] * 2
    chunks = list(served.client.chat.completions.create(stream=True, **{**kw, "extra_body": {**LONG, "echo": True}}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].delta.content == "Hé\nllo"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hé\nllo" + plain
    user_last = served.client.chat.completions.create(**{**kw, "messages": said[:1],
                                                         "extra_body": {**LONG, "echo": True}})
    assert user_last.choices[0].message.content == served.client.chat.completions.create(
        **{**kw, "messages": said[:1]}).choices[0].message.content


def test_prompt_lists_and_n_samples(served):
    one = lambda p, **kw: served.client.completions.create(model=MODEL, prompt=p, max_tokens=5,  # noqa: E731
                                                           extra_body=LONG, **kw)
    prompts = ["Héllo", [40, 50, 60], "wörld 😀"]
    out = one(prompts, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [one(p, temperature=0).choices[0].text for p in prompts]
    assert out.usage.prompt_tokens == len("Héllo".encode()) + 3 + len("wörld 😀".encode())
    assert out.usage.completion_tokens == 15
    sampled = one("seed me", n=3, temperature=1.0, seed=7)
    texts = [c.text for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and sampled.usage.completion_tokens == 15
    assert texts == [c.text for c in one("seed me", n=3, temperature=1.0, seed=7).choices]     # reproducible
    assert [one("seed me", temperature=1.0, seed=7 + j).choices[0].text for j in range(3)] == texts  # seed + j
    assert len(set(texts)) > 1                                                                  # independent
    chunks = list(one(["a", "b"], n=2, temperature=1.0, seed=3, stream=True))
    streamed = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(4)}
    assert streamed == {c.index: c.text for c in one(["a", "b"], n=2, temperature=1.0, seed=3).choices}
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 4
    err = _post(served, "completions", {"model": MODEL, "prompt": ["x"] * 40, "n": 2}).json()["error"]
    assert err["param"] == "n" and "at most 64" in err["message"]


def test_malformed_json_unknown_model_and_auth(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{served.base}/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        served.client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert httpx.get(f"{served.base}/v1/models").status_code == 401
    assert httpx.get(f"{served.base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert [m.id for m in served.client.models.list()] == [MODEL]
    assert httpx.get(f"{served.base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served.base}/nope", headers=auth).json()["error"]["code"] == 404


def test_queue_full_429_and_cancelled_streams_free_their_slots(served):
    engine, client = served.engine, served.client
    long = dict(model=MODEL, prompt="long", max_tokens=200, stream=True, extra_body=LONG)
    running = [client.completions.create(**long) for _ in range(2)]           # both slots
    wait_for(lambda: engine.stats()["active_slots"] == 2)
    queued = [client.completions.create(**long) for _ in range(engine.config.max_queue)]   # a full queue
    wait_for(lambda: engine.stats()["queue_depth"] == engine.config.max_queue)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["message"].count("queue is full") == 1, e.value.body["message"]
    for s in running + queued:                                                 # clients go away mid-stream
        next(iter(s))
        s.close()
    wait_for(lambda: engine.stats()["active_slots"] == 0 and engine.stats()["queue_depth"] == 0)
    out = client.completions.create(model=MODEL, prompt="after", max_tokens=3, extra_body=LONG)
    assert out.usage.completion_tokens == 3
    text = httpx.get(f"{served.base}/metrics").text
    for name in ("readme_jax_queue_depth", "readme_jax_active_slots", "readme_jax_generation_tokens_total",
                 "readme_jax_generation_tokens_per_second", "readme_jax_time_to_first_token_seconds_bucket",
                 "readme_jax_inter_token_latency_seconds_bucket", 'readme_jax_requests_finished_total{finish_reason="abort"}'):
        assert name in text, name


def test_engine_failure_gives_500_and_health_503(tok):
    fail = threading.Event()

    def fault_hook(step):
        if fail.is_set():
            raise RuntimeError("injected fault")

    s = Served(*make_engine(tok, fault_hook=fault_hook), tok)
    try:
        stream = s.client.completions.create(model=MODEL, prompt="a", max_tokens=200, stream=True, extra_body=LONG)
        wait_for(lambda: s.engine.stats()["active_slots"] == 1)
        fail.set()
        with pytest.raises(openai.APIError, match="injected fault"):
            list(stream)
        wait_for(lambda: httpx.get(f"{s.base}/health").status_code == 503)
        assert httpx.get(f"{s.base}/health").json()["status"] == "failed"
        with pytest.raises(openai.InternalServerError):
            s.client.completions.create(model=MODEL, prompt="b", max_tokens=2)
    finally:
        s.stop()


def test_sigterm_drains_and_exits_0(tmp_path, tok):
    from readme_jax.convert.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny", random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=2),
                           tokenizer=tok)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "readme_jax.serve", "--model", str(ckpt), "--port", str(port),
                             "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--max-model-len", "256",
                             "--drain-timeout", "60", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc=proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="tiny", prompt="drain me", max_tokens=60, stream=True,
                                           stream_options={"include_usage": True}, extra_body=LONG)
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)                                  # the in-flight request still completes
        assert rest[-1].usage.completion_tokens == 60
        assert [c.choices[0].finish_reason for c in [first] + rest if c.choices][-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
