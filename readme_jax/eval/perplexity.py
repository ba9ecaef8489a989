"""Per-domain held-out perplexity, one protocol everywhere.

Protocol (binding for every number this project reports):

* Per domain, the held-out stream is ``encode(doc) + [eos]`` over ``<domain>/heldout.jsonl`` in file order.
* Its first ``W * T`` tokens are scored, ``W = max_tokens // T`` non-overlapping windows of ``T = seq_len``
  tokens (so exactly ``W * T`` tokens, the same for every model with the same tokenizer).
* Window ``i`` covers stream tokens ``c = s[i*T : (i+1)*T]``. The model reads ``[bos] + c[:-1]`` (BOS
  first, T tokens) and is scored on predicting all of ``c``: the first token from BOS alone, every other
  token from the part of its window before it. No context crosses a window edge.
* ``nll`` is the mean negative log-likelihood per scored token (nats), ``ppl = exp(nll)``.

A domain whose held-out split has fewer than ``W * T`` tokens is an error (the count would not be fixed).

CLI: ``python -m readme_jax.eval.perplexity --model PATH --corpus DIR [--seq-len 512] [--max-tokens 4096]
[--batch-size 4] [--domains ...] [--out JSON]``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.atomic import atomic_write_json
from readme_jax.data.corpus import Corpus, load_corpus
from readme_jax.model.head_loss import nll_from_logits
from readme_jax.model.protocol import CausalLM
from readme_jax.nnx_jit import jit_method

NllFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


# ---------------------------------------------------------------------------------------- windows
def heldout_windows(corpus: Corpus | str | Path, domain: str, tokenizer, *, seq_len: int, max_tokens: int,
                    split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """The protocol's windows of one domain.

    Returns: ``(input_ids, targets)``, both int32[W, T] with T = seq_len, W = max_tokens // seq_len;
    ``input_ids[:, 0] == bos`` and ``input_ids[:, 1:] == targets[:, :-1]``.
    """
    corpus = load_corpus(corpus)
    n_windows = max_tokens // seq_len
    if n_windows < 1:
        raise ValueError(f"max_tokens={max_tokens} is less than one window of seq_len={seq_len}")
    need = n_windows * seq_len
    stream: list[int] = []
    for text in corpus.texts(domain, split):
        stream += tokenizer.encode(text, bos=False, eos=False)
        stream.append(tokenizer.eos_id)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"{corpus.path(domain, split)}: {len(stream)} tokens, fewer than the "
                         f"{need} = {n_windows} x {seq_len} the protocol scores; lower max_tokens")
    targets = np.asarray(stream[:need], np.int32).reshape(n_windows, seq_len)
    inputs = np.concatenate([np.full([n_windows, 1], tokenizer.bos_id, np.int32), targets[:, :-1]], axis=1)
    return inputs, targets


# ------------------------------------------------------------------------------------------- loss
def weighted_nll_fn(model: nnx.Module | Callable[[jax.Array], jax.Array], axis: int | None = None):
    """A jitted ``(input_ids int32[B, T], targets int32[B, T], weights float32[B, T]) -> sum(weights * nll)``
    over ``axis`` (None: one summed NLL []; -1: per row [B]).

    ``model`` is a Flax NNX module (its weights traced arguments, :func:`readme_jax.nnx_jit.jit_method`): ours
    score with ``token_nll(input_ids, targets) -> [B, T]`` (the LM head's NLL without materialising logits),
    others as ``model(input_ids) -> logits[B, T, V]``; or any plain ``forward_fn(input_ids) -> logits``.
    """
    def weighted(m, ids, targets, weights):
        nll = m.token_nll(ids, targets) if isinstance(m, CausalLM) else nll_from_logits(m(ids), targets)
        return jnp.sum(nll * weights, axis=axis)

    if isinstance(model, nnx.Module):
        return jit_method(model, weighted)
    return jax.jit(lambda ids, targets, weights: weighted(model, ids, targets, weights))


def make_nll_fn(model: nnx.Module | Callable[[jax.Array], jax.Array]) -> NllFn:
    """``(input_ids int32[B, T], targets int32[B, T], weights float32[B, T]) -> float`` summed NLL of ``model``
    (as :func:`weighted_nll_fn` takes it), jitted."""
    fn = weighted_nll_fn(model)
    return lambda ids, targets, weights: float(fn(ids, targets, weights))


def _score(nll_fn: NllFn, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray, batch_size: int,
           desc: str | None = None) -> tuple[float, float]:
    """Summed NLL and summed weight over rows, in batches of a fixed shape (the last one padded with
    zero-weight copies of row 0, so there is one compile per (batch_size, T))."""
    total, count = 0.0, float(weights.sum())
    for i in tqdm(range(0, len(inputs), batch_size), desc=desc, leave=False, disable=desc is None):
        ids, tg, w = inputs[i:i + batch_size], targets[i:i + batch_size], weights[i:i + batch_size]
        pad = batch_size - len(ids)
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            tg = np.concatenate([tg, np.repeat(tg[:1], pad, 0)])
            w = np.concatenate([w, np.zeros((pad,) + w.shape[1:], w.dtype)])
        total += nll_fn(ids, tg, w)
    return total, count


# ------------------------------------------------------------------------------------------ public
def evaluate_perplexity(model: nnx.Module | Callable[[jax.Array], jax.Array], tokenizer,
                        corpus_dir: Corpus | str | Path, *, seq_len: int = 512, max_tokens: int = 4096,
                        batch_size: int = 4, domains: Sequence[str] | None = None,
                        progress: bool = True) -> dict[str, dict[str, float]]:
    """Held-out perplexity of every domain (protocol in the module docstring).

    Args:
      model: NNX module with ``token_nll(input_ids, targets)`` (ours), or a ``forward_fn(ids) -> logits`` callable.
      tokenizer: the model's tokenizer (``encode``, ``bos_id``, ``eos_id``).
      corpus_dir: a corpus built by ``readme_jax.data.corpus``.
    Returns:
      ``{domain: {"tokens": W * T, "nll": mean nats / token, "ppl": exp(nll)}}``.
    """
    corpus = load_corpus(corpus_dir)
    nll_fn = make_nll_fn(model)
    results = {}
    for domain in domains or corpus.domains:
        inputs, targets = heldout_windows(corpus, domain, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
        total, count = _score(nll_fn, inputs, targets, np.ones(targets.shape, np.float32), batch_size,
                              desc=f"ppl {domain}" if progress else None)
        nll = total / count
        results[domain] = {"tokens": int(count), "nll": nll, "ppl": _exp(nll)}
    return results


def text_perplexity(model: nnx.Module | Callable[[jax.Array], jax.Array], tokenizer, text: str, *,
                    seq_len: int = 512, batch_size: int = 1) -> float:
    """Perplexity of one text under the same windowing (BOS first, non-overlapping windows of seq_len,
    the last one partial), every token of ``encode(text)`` scored."""
    ids = np.asarray(tokenizer.encode(text, bos=False, eos=False), np.int32)
    if len(ids) == 0:
        raise ValueError("empty text")
    n = -(-len(ids) // seq_len)
    t = min(seq_len, len(ids))
    targets = np.full([n * t], tokenizer.eos_id, np.int32)
    weights = np.zeros([n * t], np.float32)
    targets[:len(ids)], weights[:len(ids)] = ids, 1.0
    targets, weights = targets.reshape(n, t), weights.reshape(n, t)
    inputs = np.concatenate([np.full([n, 1], tokenizer.bos_id, np.int32), targets[:, :-1]], axis=1)
    total, count = _score(make_nll_fn(model), inputs, targets, weights, batch_size)
    return _exp(total / count)


def _exp(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def shuffle_words(text: str, seed: int = 0) -> str:
    """The words of ``text`` (whitespace-split) in a seeded random order, joined by single spaces: the
    sanity control for perplexity (a real model scores it far worse than the original)."""
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = [f"{'domain':<12}{'tokens':>9}{'NLL':>9}{'PPL':>11}"]
    for domain, r in results.items():
        rows.append(f"{domain:<12}{r['tokens']:>9}{r['nll']:>9.4f}{r['ppl']:>11.3f}")
    return "\n".join(rows)


def _run(args) -> dict[str, dict[str, float]] | None:
    """The results of the CLI's arguments (None: the model has no tokenizer, said on stderr)."""
    from readme_jax import load_pretrained

    if not args.corpus.is_dir():                       # before the model loads
        raise ValueError(f"{args.corpus}: no such corpus directory (expected one built by readme_jax.data.corpus)")
    model, tokenizer = load_pretrained(args.model)
    if args.tokenizer:
        from readme_jax.data.tokenizers import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer; pass --tokenizer", file=sys.stderr)
        return None
    return evaluate_perplexity(model, tokenizer, args.corpus, seq_len=args.seq_len, max_tokens=args.max_tokens,
                               batch_size=args.batch_size, domains=args.domains)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readme_jax.eval.perplexity",
                                     description="Per-domain held-out perplexity (fixed-token protocol).")
    parser.add_argument("--model", required=True, help="anything readme_jax.load_pretrained loads")
    parser.add_argument("--corpus", required=True, type=Path, help="corpus built by readme_jax.data.corpus")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored per domain")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--domains", nargs="+")
    parser.add_argument("--tokenizer", help="tokenizer file, when the model source has none")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    try:
        results = _run(args)
        if results is None:
            return 2
    except (ValueError, KeyError, OSError) as e:          # a bad path / checkpoint / corpus: one line
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        record: dict[str, Any] = {"model": str(args.model), "corpus": str(args.corpus), "seq_len": args.seq_len,
                                  "max_tokens": args.max_tokens, "domains": results}
        atomic_write_json(args.out, record, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
