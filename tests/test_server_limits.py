"""Readiness, the red-team cases, vLLM's tokenizer endpoints and the /metrics names, against one real uvicorn
server on a free 127.0.0.1 port (tiny random model, one slot). The engine's start waits on a gate, so the
first test sees the server while it is still starting."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from readme_jax.serve.__main__ import main as serve_main
from readme_jax.serve.limits import Limits
from readme_jax.serve.metrics import EngineMetrics
from readme_jax.serve.server import create_app, uvicorn_config
from tests.test_server import MODEL, byte_tokenizer, free_port, make_engine, wait_for

pytestmark = pytest.mark.slow(reason="starts a server whose engine warms up (compiles every bucket)")

MAX_MODEL_LEN = 128
LIMITS = Limits.for_context(MAX_MODEL_LEN, 64, body_timeout_s=2.0, header_timeout_s=1.0, max_connections=12)
MB = 1 << 20


class GatedServer:
    """A server whose engine starts only once ``release()`` is called."""

    def __init__(self):
        self.tok = byte_tokenizer()
        self.engine, self.metrics = make_engine(self.tok, max_num_seqs=1, max_model_len=MAX_MODEL_LEN, max_queue=2)
        self.gate = threading.Event()
        start = self.engine.start
        self.engine.start = lambda: (self.gate.wait(300), start())
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(self.engine, self.tok, model_name=MODEL, max_model_len=MAX_MODEL_LEN, default_max_tokens=4,
                         metrics=self.metrics, limits=LIMITS)
        self.server = uvicorn.Server(uvicorn_config(app, port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    def post(self, route, body=None, **kw):
        return httpx.post(f"{self.base}{route}", json=body, timeout=30, **kw)

    def stop(self):
        self.gate.set()
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def srv():
    s = GatedServer()
    yield s
    s.stop()


def raw(port: int, data: bytes, *, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(data)
    return sock


def health_seconds(base: str) -> float:
    t0 = time.perf_counter()
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    return time.perf_counter() - t0


def test_no_v1_route_answers_200_before_a_completion_can_succeed(srv):
    r = httpx.get(f"{srv.base}/v1/models")
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "starting"
    r = srv.post("/v1/completions", {"model": MODEL, "prompt": "x"})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert httpx.get(f"{srv.base}/health").json()["status"] == "starting"
    assert httpx.get(f"{srv.base}/tokenizer_info").status_code == 200           # needs no engine
    srv.gate.set()
    while httpx.get(f"{srv.base}/v1/models").status_code != 200:                # a client polling for readiness
        time.sleep(0.01)
    r = srv.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{srv.base}/health").json() == {"status": "ok"}


def test_a_20_mb_body_is_refused_413_while_health_answers(srv):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {20 * MB}\r\n\r\n").encode()
    sock = raw(srv.port, head + b'{"model": "tiny", "prompt": "' + b"x" * MB)
    assert health_seconds(srv.base) < 1.0
    assert sock.recv(4096).startswith(b"HTTP/1.1 413"), "refused on Content-Length, before the body is read"
    sock.close()
    # Chunked (no Content-Length): refused once the cap is crossed, while /health keeps answering.
    sock = raw(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    reply, sent = [], 0

    def send_chunks():
        nonlocal sent
        try:
            while sent < 20 * MB:
                sock.sendall(b"%x\r\n%s\r\n" % (MB // 4, b"x" * (MB // 4)))
                sent += MB // 4
        except OSError:
            pass
        try:
            reply.append(sock.recv(4096))
        except OSError as e:
            reply.append(repr(e).encode())

    t = threading.Thread(target=send_chunks)
    t.start()
    while t.is_alive():
        assert health_seconds(srv.base) < 1.0
        time.sleep(0.05)
    t.join()
    assert reply[0].startswith(b"HTTP/1.1 413"), reply
    assert sent < 20 * MB
    sock.close()


def test_hostile_bodies_get_their_4xx(srv):
    def status(body: bytes, ctype="application/json"):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(f"{srv.base}/v1/completions", content=body, headers=headers, timeout=30)
        return r.status_code, r.json()["error"] if r.status_code != 200 else None, len(r.content)

    deep = b'{"model": "tiny", "prompt": ' + b"[" * 60_000 + b"]" * 60_000 + b"}"
    code, err, _ = status(deep)
    assert code == 400 and "nested too deep" in err["message"]
    code, err, _ = status(b'{"model": "tiny", "prompt": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}")
    assert code == 400 and "nested too deep" in err["message"]
    code, err, _ = status(b'{"model": "tiny", "prompt": "a\\ud800b"}')
    assert code == 400 and err["param"] == "prompt" and "Unicode" in err["message"]
    code, err, _ = status(b'{"model": "tiny", "prompt": "a", "stop": ["\\udc00"]}')
    assert code == 400 and err["param"] == "stop[0]"
    code, err, size = status(json.dumps({"model": "m" * 100_000, "prompt": "x"}).encode())
    assert code == 404 and size < 1000
    code, err, size = status(json.dumps({"model": MODEL, "prompt": "x", "n": list(range(10_000))}).encode())
    assert code == 400 and err["param"] == "n" and size < 1000
    code, err, _ = status(json.dumps({"model": MODEL, "prompt": "é" * (MAX_MODEL_LEN * 13 + 1)}).encode())
    assert code == 400 and err["param"] == "prompt" and "characters" in err["message"]
    for stop in (["s"] * 65, ["a" * 9000, "b" * 9000]):
        code, err, _ = status(json.dumps({"model": MODEL, "prompt": "x", "stop": stop}).encode())
        assert code == 400 and err["param"] == "stop", err
    ok = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1, "stop": [f"s{i}" for i in range(64)]}).encode()
    assert status(ok)[0] == 200
    assert status(ok, ctype=None)[0] == 200 and status(ok, ctype="application/json; charset=utf-8")[0] == 200
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert status(ok, ctype=ctype)[0] == 415
    sock = raw(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert sock.recv(4096).startswith(b"HTTP/1.1 408")                  # the body never arrives
    sock.close()


def test_slow_headers_and_idle_connections_are_closed_and_capped(srv):
    slow = raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n")          # headers never finished
    idle = [raw(srv.port, b"") for _ in range(LIMITS.max_connections)]     # half-open: nothing sent
    assert httpx.get(f"{srv.base}/health").status_code == 503              # the connection cap
    t0 = time.perf_counter()
    assert slow.recv(1) == b"" and all(s.recv(1) == b"" for s in idle)     # closed by the header timeout
    assert time.perf_counter() - t0 < LIMITS.header_timeout_s + 3
    assert httpx.get(f"{srv.base}/health").status_code == 200
    for s in [slow] + idle:
        s.close()


def test_vllm_tokenizer_endpoints(srv):
    tok = srv.tok
    r = srv.post("/tokenize", {"model": MODEL, "prompt": "Grüß 😀", "add_special_tokens": False})
    assert r.json() == {"count": len("Grüß 😀".encode()), "max_model_len": MAX_MODEL_LEN,
                        "tokens": tok.encode("Grüß 😀"), "token_strs": None}
    assert srv.post("/tokenize", {"prompt": "ab", "return_token_strs": True}).json()["token_strs"] == ["a", "b"]
    chat = srv.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    assert chat == tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert srv.post("/detokenize", {"tokens": tok.encode("Grüß 😀")}).json() == {"prompt": "Grüß 😀"}
    info = httpx.get(f"{srv.base}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == tok.chat_template
    assert srv.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"] == [2]
    for route, body, param in (("/detokenize", {"tokens": [10**6]}, "tokens"), ("/tokenize", {"prompt": 3}, "prompt"),
                               ("/tokenize", {"prompt": "x", "extra": 1}, "extra")):
        r = srv.post(route, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert srv.post("/tokenize", {"model": "other", "prompt": "x"}).status_code == 404


def test_metrics_carry_vllm_names_and_parse(srv):
    for _ in range(2):                                  # the counts below hold whichever tests ran before
        srv.post("/v1/completions", {"model": MODEL, "prompt": "metrics", "max_tokens": 3, "ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.base}/metrics").text)}
    want = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
            "vllm:kv_cache_usage_perc": "gauge", "vllm:prefix_cache_queries": "counter",
            "vllm:prefix_cache_hits": "counter", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
            "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
            "vllm:time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
            "vllm:request_queue_time_seconds": "histogram", "vllm:request_success": "counter",
            "readme_jax_queue_depth": "gauge", "readme_jax_step_seconds": "histogram"}
    for name, kind in want.items():
        assert families[name].type == kind, name
        assert all(s.labels.get("model_name", MODEL) == MODEL for s in families[name].samples)
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", MODEL)))] >= 2
    assert value[("vllm:generation_tokens_total", (("model_name", MODEL),))] >= 5
    assert value[("vllm:e2e_request_latency_seconds_count", (("model_name", MODEL),))] >= 2
    # KV / prefix-cache series follow whatever engine.stats() reports (the paged engine's keys).
    m = EngineMetrics()
    m.bind_model_name("m")
    m.set_engine_stats({"kv_cache_usage": 0.25, "prefix_cache_queries": 100, "prefix_cache_hits": 40})
    m.set_engine_stats({"prefix_cache_queries": 150, "prefix_cache_hits": 40})
    text = m.exposition().decode()
    assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.25' in text
    assert 'vllm:prefix_cache_queries_total{model_name="m"} 150.0' in text
    assert 'vllm:prefix_cache_hits_total{model_name="m"} 40.0' in text


def test_api_key_sources_and_empty_key_refused(tmp_path, capsys, monkeypatch):
    from readme_jax.serve.__main__ import api_key, parse_args

    monkeypatch.delenv("READMEJAX_API_KEY", raising=False)
    (tmp_path / "key").write_text("s3cret\n")
    (tmp_path / "empty").write_text("\n")
    assert api_key(parse_args(["--model", "x", "--api-key-file", str(tmp_path / "key")])) == "s3cret"
    assert api_key(parse_args(["--model", "x"])) is None
    monkeypatch.setenv("READMEJAX_API_KEY", "from-env")
    assert api_key(parse_args(["--model", "x"])) == "from-env"
    for argv, env in ((["--api-key", ""], None), (["--api-key", "  "], None),
                      (["--api-key-file", str(tmp_path / "empty")], None), ([], ""),
                      (["--api-key-file", str(tmp_path / "absent")], None)):
        if env is not None:
            monkeypatch.setenv("READMEJAX_API_KEY", env)
        assert serve_main(["--model", str(tmp_path / "no-model")] + argv) == 2      # before the model loads
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and ("API key" in err or "api-key" in err), err
    with pytest.raises(ValueError, match="api_key"):
        create_app(None, None, model_name="m", max_model_len=8, default_max_tokens=1, api_key="")
