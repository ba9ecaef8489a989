"""Log-likelihood multiple-choice scoring (lm-evaluation-harness conventions), MMLU or the built-in task.

Protocol, per item (context, C choices, answer) and choice c:

* tokens = ``[bos] + encode(context) + encode(choices[c])`` (``encode(.., bos=False, eos=False)``, context
  and continuation encoded separately). When ``len(context) + len(continuation) > max_len`` tokens, the
  context is cut from the LEFT (BOS kept) so the model reads at most ``max_len`` tokens.
* The model reads ``tokens[:-1]`` and ``loglik[c] = sum log p(t | everything before)`` over the
  continuation's tokens only.
* ``acc``: ``argmax_c loglik``; ``acc_norm``: ``argmax_c loglik[c] / len(choices[c].encode("utf-8"))`` (lm-eval's
  byte-length normalisation); ties go to the lowest index.
* Group and overall summaries are micro averages over items (every item weighs the same).

Rows are scored in batches of a fixed ``batch_size`` (the last one filled with zero-weight rows), each
right-padded to a multiple of ``bucket`` tokens with weight 0 (the model is causal, so padding after a
row never changes its earlier positions): one compile per length bucket.

CLI: ``python -m readme_jax.eval.multiple_choice --model PATH [--model PATH2 ...] (--mmlu DIR [--k-shot 5]
| --corpus DIR [--items-per-domain 40 --context-tokens 64 --continuation-tokens 24 --seed 0])
[--batch-size 8] [--max-len 512] [--out JSON]``: a table per model, then every model against the first
(McNemar, paired bootstrap; :mod:`readme_jax.eval.paired`). The built-in items are cut with the first
model's tokenizer and then scored as text by every model.

Dimension names: B batch (rows), T time (tokens), C choices, N items, R rows (item x choice).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.atomic import atomic_write_json
from readme_jax.data.corpus import load_corpus
from readme_jax.eval.mc_tasks import MCItem, builtin_items, mmlu_items
from readme_jax.eval.paired import compare_models, format_comparison
from readme_jax.eval.perplexity import weighted_nll_fn

__all__ = ["MCItem", "ItemResult", "make_loglik_fn", "encode_item", "score_rows", "evaluate_items",
           "correct_flags", "summarize", "format_summary", "mmlu_items", "builtin_items", "main"]

LoglikFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
BUCKET = 32


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """The scores of one item. logliks, byte_lengths: [C]; pred / pred_norm: argmax of loglik and of
    loglik / byte length (lowest index on ties)."""

    group: str
    answer: int
    logliks: tuple[float, ...]
    byte_lengths: tuple[int, ...]
    pred: int
    pred_norm: int

    @property
    def correct(self) -> bool:
        return self.pred == self.answer

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.answer

    def to_json(self) -> dict:
        return {"group": self.group, "answer": self.answer, "logliks": list(self.logliks),
                "byte_lengths": list(self.byte_lengths), "pred": self.pred, "pred_norm": self.pred_norm,
                "correct": self.correct, "correct_norm": self.correct_norm}

    @classmethod
    def from_json(cls, d: dict) -> "ItemResult":
        return cls(group=d["group"], answer=int(d["answer"]), logliks=tuple(float(x) for x in d["logliks"]),
                   byte_lengths=tuple(int(x) for x in d["byte_lengths"]), pred=int(d["pred"]),
                   pred_norm=int(d["pred_norm"]))


# ------------------------------------------------------------------------------------------ scoring
def make_loglik_fn(model: nnx.Module | Callable[[jax.Array], jax.Array]) -> LoglikFn:
    """A jitted ``(input_ids int32[B, T], targets int32[B, T], weights float32[B, T]) -> float32[B]``:
    per row, ``sum_t weights * log p(targets[t] | input_ids[:t+1])``; ``model`` as
    :func:`readme_jax.eval.perplexity.weighted_nll_fn` takes it (ours by ``token_nll``, others by logits).
    """
    fn = weighted_nll_fn(model, axis=-1)
    return lambda ids, targets, weights: -np.asarray(fn(ids, targets, weights))


def encode_item(item: MCItem, tokenizer, max_len: int = 512) -> list[tuple[list[int], int]]:
    """Per choice, ``(tokens, n_continuation)``: tokens = ``[bos] + context + continuation`` (context cut
    from the left so ``len(tokens) - 1 <= max_len``; eos stands in for a tokenizer without bos)."""
    ctx = list(tokenizer.encode(item.context, bos=False, eos=False))
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    rows = []
    for c, choice in enumerate(item.choices):
        cont = list(tokenizer.encode(choice, bos=False, eos=False))
        if not cont:
            raise ValueError(f"group {item.group!r}: choice {c} {choice!r} encodes to no tokens")
        if len(cont) > max_len:
            raise ValueError(f"group {item.group!r}: choice {c} is {len(cont)} tokens, more than "
                             f"max_len={max_len}")
        keep = ctx[max(0, len(ctx) + len(cont) - max_len):]
        rows.append(([prefix] + keep + cont, len(cont)))
    return rows


def score_rows(loglik_fn: LoglikFn, rows: Sequence[tuple[Sequence[int], int]], *, batch_size: int = 8,
               bucket: int = BUCKET, pad_id: int = 0, max_len: int | None = None,
               desc: str | None = None) -> np.ndarray:
    """float64[R]: the continuation log-likelihood of each ``(tokens, n_continuation)`` row.

    Rows are sorted longest first and scored in batches of exactly ``batch_size`` rows; a batch is
    ``[B, T]`` with T the longest ``len(tokens) - 1`` in it rounded up to a multiple of ``bucket`` (at most
    ``max_len`` when given and enough), right-padded with ``pad_id`` at weight 0.
    """
    if batch_size < 1 or bucket < 1:
        raise ValueError(f"batch_size and bucket must be >= 1, got {batch_size}, {bucket}")
    out = np.zeros(len(rows), np.float64)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=desc is None,
                      unit="batch"):
        batch = order[start:start + batch_size]
        longest = len(rows[batch[0]][0]) - 1
        T = -(-longest // bucket) * bucket
        if max_len is not None and longest <= max_len:
            T = min(T, max_len)
        ids = np.full([batch_size, T], pad_id, np.int32)
        targets = np.full([batch_size, T], pad_id, np.int32)
        weights = np.zeros([batch_size, T], np.float32)
        for b, r in enumerate(batch):
            tokens, n_cont = rows[r]
            n = len(tokens) - 1
            ids[b, :n], targets[b, :n] = tokens[:-1], tokens[1:]
            weights[b, n - n_cont:n] = 1.0
        out[batch] = loglik_fn(ids, targets, weights)[:len(batch)]
    return out


def evaluate_items(model: nnx.Module | Callable[[jax.Array], jax.Array], tokenizer, items: Sequence[MCItem], *,
                   batch_size: int = 8, max_len: int = 512, bucket: int = BUCKET,
                   desc: str | None = None) -> list[ItemResult]:
    """Score every choice of every item (protocol in the module docstring); one :class:`ItemResult` per
    item, in order. ``desc``: a tqdm label (None: no progress bar)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    rows, spans = [], []
    for item in items:
        encoded = encode_item(item, tokenizer, max_len)
        spans.append((len(rows), len(rows) + len(encoded)))
        rows += encoded
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = tokenizer.eos_id if pad_id is None else pad_id
    logliks = score_rows(make_loglik_fn(model), rows, batch_size=batch_size, bucket=bucket, pad_id=pad_id,
                         max_len=max_len, desc=desc)
    results = []
    for item, (lo, hi) in zip(items, spans):
        ll = logliks[lo:hi]                                                             # [C]
        nbytes = np.array([len(c.encode("utf-8")) for c in item.choices])              # [C]
        results.append(ItemResult(item.group, item.answer, tuple(map(float, ll)), tuple(map(int, nbytes)),
                                  int(np.argmax(ll)), int(np.argmax(ll / np.maximum(nbytes, 1)))))
    return results


def correct_flags(results: Sequence[ItemResult], *, norm: bool = False) -> np.ndarray:
    """bool[N]: item i right under acc (or acc_norm when ``norm``)."""
    return np.array([r.correct_norm if norm else r.correct for r in results], bool)


def summarize(results: Sequence[ItemResult]) -> dict:
    """``{"groups": {group: {"acc", "acc_norm", "n"}} (first-seen order), "overall": {...}}``."""
    def stats(rs):
        return {"acc": float(np.mean(correct_flags(rs))) if rs else float("nan"),
                "acc_norm": float(np.mean(correct_flags(rs, norm=True))) if rs else float("nan"), "n": len(rs)}

    groups: dict[str, list[ItemResult]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    return {"groups": {g: stats(rs) for g, rs in groups.items()}, "overall": stats(list(results))}


def format_summary(summary: dict) -> str:
    width = max([7] + [len(g) for g in summary["groups"]])
    lines = [f"{'group':<{width}}{'n':>7}{'acc':>9}{'acc_norm':>10}"]
    for name, s in [*summary["groups"].items(), ("overall", summary["overall"])]:
        lines.append(f"{name:<{width}}{s['n']:>7}{s['acc']:>9.4f}{s['acc_norm']:>10.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m readme_jax.eval.multiple_choice",
                                description="Log-likelihood multiple-choice accuracy (lm-eval conventions).")
    p.add_argument("--model", action="append", required=True, help="anything readme_jax.load_pretrained "
                   "loads; repeat to compare models (each against the first)")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--mmlu", type=Path, help="MMLU data folder (<subject>_test.csv / _dev.csv, or test/ dev/)")
    task.add_argument("--corpus", type=Path, help="corpus built by readme_jax.data.corpus (built-in task)")
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--subjects", nargs="+", help="MMLU subjects (default: all)")
    p.add_argument("--items-per-domain", type=int, default=40)
    p.add_argument("--context-tokens", type=int, default=64)
    p.add_argument("--continuation-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domains", nargs="+", help="corpus domains (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--bootstrap", type=int, default=10000, help="paired bootstrap resamples (0: none)")
    p.add_argument("--out", type=Path, help="write summaries, per-item results and comparisons as JSON here")
    return p


def _labels(paths: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for p in paths:
        labels.append(p if p not in labels else f"{p}#{len(labels) + 1}")
    return labels


def _run(args) -> dict[str, Any]:
    from readme_jax import load_pretrained

    missing = [m for m in args.model if not Path(m).exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such model file or folder")
    if args.out is not None and not args.out.parent.is_dir():
        raise ValueError(f"{args.out.parent}: no such folder for --out")
    if args.mmlu is not None:
        items = mmlu_items(args.mmlu, k_shot=args.k_shot, subjects=args.subjects)
        task = {"kind": "mmlu", "path": str(args.mmlu), "k_shot": args.k_shot}
    else:
        if not args.corpus.is_dir():
            raise ValueError(f"{args.corpus}: no such corpus folder")
        corpus = load_corpus(args.corpus)
        items = None
        task = {"kind": "builtin", "corpus": str(args.corpus), "items_per_domain": args.items_per_domain,
                "context_tokens": args.context_tokens, "continuation_tokens": args.continuation_tokens,
                "seed": args.seed}
    record: dict[str, Any] = {"task": task, "max_len": args.max_len, "models": {}, "comparison": {}}
    results: dict[str, list[ItemResult]] = {}
    for label, path in zip(_labels(args.model), args.model):
        model, tokenizer = load_pretrained(path)
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer found with the model")
        if items is None:
            items = builtin_items(corpus, tokenizer, items_per_domain=args.items_per_domain,
                                  context_tokens=args.context_tokens,
                                  continuation_tokens=args.continuation_tokens, seed=args.seed,
                                  domains=args.domains)
        if not items:
            raise ValueError(f"{args.mmlu or args.corpus}: no items to score")
        results[label] = evaluate_items(model, tokenizer, items, batch_size=args.batch_size,
                                        max_len=args.max_len, desc=f"mc {Path(path).name}")
        del model
        summary = summarize(results[label])
        print(f"\n== {label} ({len(items)} items)\n{format_summary(summary)}", flush=True)
        record["models"][label] = {"path": str(path), "summary": summary,
                                   "items": [r.to_json() for r in results[label]]}
    reference = next(iter(results))
    for metric, norm in (("acc", False), ("acc_norm", True)):
        rows = compare_models({k: correct_flags(v, norm=norm) for k, v in results.items()}, reference,
                              bootstrap_samples=args.bootstrap, seed=args.seed)
        record["comparison"][metric] = rows
        if len(results) > 1:
            print(f"\n== {metric}: paired vs {reference} (McNemar exact; bootstrap 95% CI)\n"
                  f"{format_comparison(rows)}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        record = _run(args)
        if args.out:
            atomic_write_json(args.out, record, indent=1)
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
