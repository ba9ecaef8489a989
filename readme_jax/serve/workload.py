"""Serving workloads: arrival times and lengths (an Azure-format trace or synthetic), and real expert
streams (held-out corpus text routed by a Read-ME export's router), cached on disk.

- **Azure-format CSV** (``TIMESTAMP, ContextTokens, GeneratedTokens``; the public dataset is
  github.com/Azure/AzurePublicDataset, "Azure LLM inference trace 2023"): :func:`read_azure_csv` gives
  arrival seconds from the first request, prompt and output lengths.
- **Synthetic arrivals**: :func:`poisson_arrivals` (exponential gaps) and :func:`gamma_arrivals` (gamma gaps
  with a coefficient of variation: cv > 1 is burstier than Poisson).
- **Rate scaling**: :func:`scale_to_rate` multiplies every arrival time so the mean rate (requests over the
  span) becomes the target; order and relative burstiness are kept.
- **Truncation** (:func:`truncate`): the first ``max_requests`` requests in arrival order; a prompt longer
  than ``max_prompt`` keeps ``max_prompt`` tokens, an output longer than ``max_new`` stops at ``max_new``
  (as a ``max_tokens`` limit would); lengths are at least 1.
- **Expert streams**: :func:`route_corpus` tokenises the held-out split of every domain, routes it with the
  export's tuned router in windows of ``window`` tokens (each window sees its own preceding text), and keeps
  one expert array per domain; :func:`assign_experts` gives each request a contiguous span of one domain's
  stream (domain uniform, offset uniform, seeded; wraps around). The span's first P entries are the prompt's
  experts, entry P + j is decode step j's: decode tokens are the held-out continuation of the prompt
  (teacher forcing), so their experts are the router's on real text that follows the prompt.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from readme_jax.atomic import atomic_file
from readme_jax.errors import ConfigError
from readme_jax.model.protocol import is_routed

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclasses.dataclass(frozen=True)
class Trace:
    """Requests in arrival order: arrival <float64>[N] seconds, prompt / output <int64>[N] tokens."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return int(self.arrival.shape[0])

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests per second over the span); inf for a burst at one instant."""
        span = float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")


def _parse_time(text: str, where: str) -> float:
    try:
        return _dt.datetime.strptime(text.strip()[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        try:
            return _dt.datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            raise ConfigError(f"{where}: TIMESTAMP {text!r} is not 'YYYY-MM-DD HH:MM:SS[.fraction]'") from None


def read_azure_csv(path: str | Path) -> Trace:
    """An Azure-format CSV -> :class:`Trace` (arrivals relative to the earliest, sorted by time)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such trace file (expected an Azure-format CSV with columns "
                          f"{', '.join(AZURE_COLUMNS)})")
    times, prompt, output = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            where = f"{path}:{lineno}"
            times.append(_parse_time(row["TIMESTAMP"], where))
            try:
                prompt.append(int(row["ContextTokens"]))
                output.append(int(row["GeneratedTokens"]))
            except ValueError:
                raise ConfigError(f"{where}: ContextTokens / GeneratedTokens must be integers") from None
    if not times:
        raise ConfigError(f"{path}: no requests")
    t = np.asarray(times, np.float64)
    order = np.argsort(t, kind="stable")
    return Trace(t[order] - t[order[0]], np.asarray(prompt, np.int64)[order], np.asarray(output, np.int64)[order])


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """<float64>[n] arrival times (first at 0) of a Poisson process of ``rate`` requests per second."""
    return gamma_arrivals(n, rate, cv=1.0, seed=seed)


def gamma_arrivals(n: int, rate: float, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """<float64>[n] arrival times (first at 0) with gamma gaps of mean 1/rate and coefficient of variation cv."""
    if n < 1 or rate <= 0 or cv <= 0:
        raise ConfigError(f"gamma_arrivals: need n >= 1, rate > 0, cv > 0; got n={n}, rate={rate}, cv={cv}")
    shape = 1.0 / cv ** 2
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def scale_to_rate(trace: Trace, rate: float) -> Trace:
    """The trace with arrival times stretched so its mean rate is ``rate`` requests per second."""
    if rate <= 0 or not np.isfinite(trace.rate):
        raise ConfigError(f"scale_to_rate: need rate > 0 and a trace with a time span; got rate={rate}, "
                          f"trace rate={trace.rate}")
    return dataclasses.replace(trace, arrival=trace.arrival * (trace.rate / rate))


def truncate(trace: Trace, *, max_requests: int | None = None, max_prompt: int | None = None,
             max_new: int | None = None) -> Trace:
    """First ``max_requests`` requests; prompts cut to ``max_prompt`` and outputs to ``max_new`` tokens."""
    n = len(trace) if max_requests is None else min(int(max_requests), len(trace))
    prompt, output = trace.prompt[:n], trace.output[:n]
    if max_prompt is not None:
        prompt = np.minimum(prompt, int(max_prompt))
    if max_new is not None:
        output = np.minimum(output, int(max_new))
    return Trace(trace.arrival[:n].copy(), np.maximum(prompt, 1), np.maximum(output, 1))


# ---------------------------------------------------------------------------------------- expert streams
def synthetic_streams(num_experts: int, tokens: int, *, domains: int | None = None, locality: float = 0.71,
                      seed: int = 0) -> list[np.ndarray]:
    """Per-domain <int32>[tokens] expert streams for tests and development: domain d favours expert d
    (p = 0.5, the rest uniform), and each token keeps the previous token's expert with p = ``locality``."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(domains or num_experts):
        p = np.full(num_experts, 0.5 / max(num_experts - 1, 1))
        p[d % num_experts] = 0.5 if num_experts > 1 else 1.0
        fresh = rng.choice(num_experts, size=tokens, p=p / p.sum())
        keep = rng.random(tokens) < locality
        keep[0] = False
        src = np.maximum.accumulate(np.where(keep, 0, np.arange(tokens)))
        out.append(fresh[src].astype(np.int32))
    return out


def _stream_key(export: Path, corpus_root: Path, tokens_per_domain: int, window: int) -> str:
    h = hashlib.sha256()
    for root in (export, corpus_root):
        for p in sorted(q for q in root.rglob("*") if q.is_file() and q.suffix in (".json", ".yaml", ".safetensors",
                                                                                 ".npz", ".jsonl", ".model")):
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"{tokens_per_domain}:{window}".encode())
    return h.hexdigest()[:16]


def route_corpus(export: str | Path, corpus_root: str | Path, *, tokens_per_domain: int = 32768,
                 window: int = 512, batch: int = 8, cache_dir: str | Path | None = None) -> dict:
    """Route each domain's held-out text with the export's router -> {"domains": [...], "streams":
    [<int32>[n_d], ...]} (see the module doc). With ``cache_dir`` the result is kept in
    ``cache_dir/streams-<key>.npz`` (key: the export's and corpus' files, sizes, mtimes and the settings)."""
    export, corpus_root = Path(export), Path(corpus_root)
    if not export.is_dir():
        raise ConfigError(f"{export}: no such export directory (expected `<run>/export` of a default run)")
    from readme_jax.data.corpus import load_corpus
    corpus = load_corpus(corpus_root)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"streams-{_stream_key(export, corpus_root, tokens_per_domain, window)}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as z:
                domains = json.loads(str(z["domains"]))
                return {"domains": domains, "streams": [z[f"s{i}"] for i in range(len(domains))]}

    import jax
    import jax.numpy as jnp

    from readme_jax.convert.load import load_pretrained
    model, tokenizer = load_pretrained(export)
    if not is_routed(model) or tokenizer is None:
        raise ConfigError(f"{export}: not a Read-ME export with a tokenizer (need .route(ids) and a tokenizer)")
    route = jax.jit(lambda ids: model.route(ids))
    streams = []
    for domain in corpus.domains:
        ids: list[int] = []
        for text in corpus.texts(domain, "heldout"):
            ids += tokenizer.encode(text, bos=True)
            if len(ids) >= tokens_per_domain:
                break
        n = (min(len(ids), tokens_per_domain) // window) * window
        if n == 0:
            raise ConfigError(f"{corpus_root}/{domain}: held-out split has {len(ids)} tokens, fewer than one "
                              f"routing window of {window}")
        rows = np.asarray(ids[:n], np.int32).reshape(-1, window)
        pad = (-rows.shape[0]) % batch
        rows_p = np.concatenate([rows, np.zeros((pad, window), np.int32)])
        out = [np.asarray(route(jnp.asarray(rows_p[i:i + batch]))) for i in range(0, rows_p.shape[0], batch)]
        streams.append(np.concatenate(out)[:rows.shape[0]].reshape(-1).astype(np.int32))
    result = {"domains": list(corpus.domains), "streams": streams}
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache_path, suffix=".npz") as tmp:
            np.savez(tmp, domains=json.dumps(result["domains"]), **{f"s{i}": s for i, s in enumerate(streams)})
    return result


def assign_experts(prompt: np.ndarray, output: np.ndarray, streams: Sequence[np.ndarray],
                   seed: int = 0) -> list[np.ndarray]:
    """Per request an <int32>[P + G - 1] span of one domain's expert stream (see the module doc).

    prompt, output: <int>[N] lengths P, G. Entries [0, P) are prompt tokens, P + j is decode step j's token."""
    if not streams or any(s.size == 0 for s in streams):
        raise ConfigError("assign_experts: need at least one non-empty expert stream")
    rng = np.random.default_rng(seed)
    out = []
    for p, g in zip(np.asarray(prompt), np.asarray(output)):
        s = streams[int(rng.integers(len(streams)))]
        n = int(p) + int(g) - 1
        start = int(rng.integers(s.size))
        out.append(np.take(s, np.arange(start, start + n), mode="wrap").astype(np.int32))
    return out
