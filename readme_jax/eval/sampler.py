"""Held-out documents drawn with a seed across the whole held-out split, cut into scoring windows.

The evaluation suite's perplexity protocol (:mod:`readme_jax.eval.suite`); the main job's quick protocol,
the first tokens of the split in file order, stays :mod:`readme_jax.eval.perplexity`.

Per domain:

* **documents**: the domain's ``heldout.jsonl`` documents (the train split is never opened) in the order of
  ``np.random.default_rng([seed, crc32(domain)]).permutation(n_docs)``, taken whole, in that order, until
  their tokens ``encode(doc) + [eos]`` reach ``min_tokens``. A domain's draw does not depend on which other
  domains are asked for. A split with fewer than ``min_tokens`` tokens is an error.
* **windows**: each document's tokens ``s`` are cut into ``ceil(len(s) / T)`` windows ``c_k = s[kT:(k+1)T]``
  (T = seq_len); the model reads ``[bos] + c_k[:-1]`` and is scored on every token of ``c_k``; the last window
  of a document is right-padded to T with weight 0. No context crosses a window or document edge, so the
  windows are the units a bootstrap resamples (:mod:`readme_jax.eval.paired`).

Dimension names: W windows, T tokens per window, N documents drawn.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np

from readme_jax.data.corpus import Corpus, load_corpus

SPLIT = "heldout"


@dataclasses.dataclass(frozen=True)
class DomainSample:
    """The windows of one domain's drawn documents.

    doc_index int[N]: line positions (0-based, among non-blank lines) of the drawn documents in
    ``heldout.jsonl``, in draw order; inputs, targets int32[W, T]; weights float32[W, T] (1 scored, 0 pad);
    window_doc int32[W]: the position in ``doc_index`` of each window's document.
    """

    domain: str
    doc_index: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    window_doc: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.weights.sum())


def heldout_documents(corpus: Corpus, domain: str) -> list[str]:
    """The texts of ``domain``'s held-out split, in file order."""
    return list(corpus.texts(domain, SPLIT))


def draw_order(n_docs: int, domain: str, seed: int) -> np.ndarray:
    """int[n_docs]: the seeded order in which a domain's held-out documents are taken."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))]).permutation(n_docs)


def sample_documents(corpus: Corpus | str | Path, domain: str, tokenizer, *, min_tokens: int,
                     seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """``(doc_index int[N], tokens per document)``: whole held-out documents in draw order until their
    ``encode(doc) + [eos]`` tokens reach ``min_tokens`` (see the module docstring)."""
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    corpus = load_corpus(corpus)
    if domain not in corpus.domains:
        raise ValueError(f"{corpus.root}: no domain {domain!r}; domains: {corpus.domains}")
    texts = heldout_documents(corpus, domain)
    chosen, docs, total = [], [], 0
    for i in draw_order(len(texts), domain, seed):
        ids = list(tokenizer.encode(texts[i], bos=False, eos=False)) + [tokenizer.eos_id]
        chosen.append(int(i))
        docs.append(ids)
        total += len(ids)
        if total >= min_tokens:
            return np.asarray(chosen, np.int64), docs
    raise ValueError(f"{corpus.path(domain, SPLIT)}: {total} tokens in {len(texts)} documents, fewer than "
                     f"min_tokens={min_tokens}; lower it")


def document_windows(docs: list[list[int]], *, seq_len: int, bos_id: int,
                     pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, targets, weights, window_doc)`` of the documents' token lists (see the module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows = [(d, doc[k:k + seq_len]) for d, doc in enumerate(docs) for k in range(0, len(doc), seq_len)]
    W = len(rows)
    targets = np.full([W, seq_len], pad_id, np.int32)
    weights = np.zeros([W, seq_len], np.float32)
    for r, (_, chunk) in enumerate(rows):
        targets[r, :len(chunk)], weights[r, :len(chunk)] = chunk, 1.0
    inputs = np.concatenate([np.full([W, 1], bos_id, np.int32), targets[:, :-1]], axis=1)
    return inputs, targets, weights, np.asarray([d for d, _ in rows], np.int32)


def sample_domain(corpus: Corpus | str | Path, domain: str, tokenizer, *, min_tokens: int, seq_len: int,
                  seed: int = 0) -> DomainSample:
    """The drawn documents of ``domain`` as scoring windows (BOS: the tokenizer's, else its eos)."""
    doc_index, docs = sample_documents(corpus, domain, tokenizer, min_tokens=min_tokens, seed=seed)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    pad = getattr(tokenizer, "pad_id", None)
    inputs, targets, weights, window_doc = document_windows(docs, seq_len=seq_len, bos_id=bos,
                                                            pad_id=tokenizer.eos_id if pad is None else pad)
    return DomainSample(domain, doc_index, inputs, targets, weights, window_doc)


def describe(sample: DomainSample) -> dict:
    """A JSON-able record of a draw: documents (their line positions), windows, scored tokens."""
    return {"documents": len(sample.doc_index), "doc_index": [int(i) for i in sample.doc_index],
            "windows": int(len(sample.inputs)), "tokens": sample.tokens}

