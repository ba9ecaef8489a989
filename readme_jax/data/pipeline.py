"""Grain input pipelines: tokenise -> pack -> shuffle -> batch, deterministic and resumable.

Packing (concatenate-and-chunk), worked on a tiny example with ``bos=1``, ``eos=2`` and ``seq_len T=4``::

    documents          "a b c"          "d e"          "f g h i"
    token ids          5 6 7            8 9            10 11 12 13
    stream             1 5 6 7 2  1 8 9 2  1 10 11 12 13 2        ([bos] + ids + [eos] per document)
    sequence i = stream[i*T : i*T + T + 1]   (T + 1 tokens; neighbours share one token, so every stream
                                              token after the first is a target exactly once)
    seq 0   window      1  5  6  7  2
            input_ids   1  5  6  7
            targets     5  6  7  2
            loss_mask   1  1  1  1
    seq 1   window      2  1  8  9  2
            input_ids   2  1  8  9
            targets     1  8  9  2
            loss_mask   0  1  1  1        <- the BOS that opens the next document is not predictable: masked
    seq 2   window      2  1 10 11 12
            ...
    the stream's tail that does not fill a whole window (here ``13 2``) is dropped.

Attention is not blocked at document boundaries (the model contract has no segment ids); the EOS + BOS
pair tells the model a new document starts. With ``bos=False`` the stream is ``ids + [eos]`` per document
and the mask is all ones.

Sequences are then shuffled by ``seed`` (grain's index shuffle, a fresh permutation each epoch) and
batched. The iterator is a grain ``DatasetIterator``: ``it.get_state()`` is a small JSON-serialisable dict
and ``it.set_state(state)`` on a fresh iterator of the same dataset resumes at exactly the next batch.

Tokenising a whole corpus split is cached as an ``int32`` ``.npy`` under ``$READMEJAX_CACHE/tokens/``,
keyed by the jsonl file's sha256 (from the manifest), the tokenizer's fingerprint and ``bos``.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import grain
import numpy as np
from tqdm.auto import tqdm

from readme_jax import assets
from readme_jax.atomic import atomic_file
from readme_jax.data.corpus import Corpus, load_corpus, tokenizer_fingerprint

TextSource = Corpus | str | os.PathLike | Sequence[str]


# ------------------------------------------------------------------------------------- tokenisation
def tokenize_stream(texts: Iterable[str], tokenizer, *, bos: bool = True, batch: int = 64,
                    desc: str | None = None) -> np.ndarray:
    """Concatenate ``[bos] + encode(doc) + [eos]`` over ``texts`` (``bos=False``: ``encode(doc) + [eos]``).

    Returns: int32[N] token stream.
    """
    if bos and tokenizer.bos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no BOS token; pass bos=False")
    if tokenizer.eos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token to separate documents")
    head = [tokenizer.bos_id] if bos else []
    tail = np.array([tokenizer.eos_id], np.int32)
    parts: list[np.ndarray] = []
    buf: list[str] = []

    def flush():
        for ids in tokenizer.encode_batch(buf):
            parts.append(np.asarray(head + list(ids), np.int32))
            parts.append(tail)
        buf.clear()

    for text in tqdm(texts, desc=desc, unit="doc", leave=False, disable=desc is None):
        buf.append(text)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def domain_tokens(source: TextSource, domain: str | None, split: str, tokenizer, *, bos: bool = True,
                  cache: bool = True) -> np.ndarray:
    """The packed token stream (see :func:`tokenize_stream`) of one corpus split, or of a list of texts.

    For a corpus the stream is cached (``$READMEJAX_CACHE/tokens``) and returned memory-mapped.
    Returns: int32[N].
    """
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return tokenize_stream(source, tokenizer, bos=bos)
    corpus = load_corpus(source)
    if domain is None:
        raise ValueError("domain is required for a corpus source")
    rec = corpus.info(domain, split)
    desc = f"tokenise {domain}/{split}"
    if not cache:
        return tokenize_stream(corpus.texts(domain, split), tokenizer, bos=bos, desc=desc)
    folder = assets.cache_dir("tokens")
    path = folder / f"{rec['sha256'][:24]}-{tokenizer_fingerprint(tokenizer)}-{'bos' if bos else 'nobos'}.npy"
    if not path.exists():
        tokens = tokenize_stream(corpus.texts(domain, split), tokenizer, bos=bos, desc=desc)
        with atomic_file(path, suffix=".npy") as tmp:  # concurrent builders write the same bytes
            np.save(tmp, tokens)
    return np.load(path, mmap_mode="r")


# ------------------------------------------------------------------------------------------ packing
def num_sequences(num_tokens: int, seq_len: int) -> int:
    """Whole windows of ``seq_len + 1`` tokens, stride ``seq_len``, in a stream of ``num_tokens``."""
    return max(0, (num_tokens - 1) // seq_len)


class PackedSequence:
    """Sequence ``i`` of a token stream (a grain map function; holds the stream, picklable).

    Returns a dict: ``input_ids`` int32[T], ``targets`` int32[T] (next token), ``loss_mask`` float32[T]
    (0 where the target is the BOS that starts a document), and ``domain`` int32[] if ``domain_id`` is set.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, bos_id: int | None, domain_id: int | None = None):
        self.tokens, self.seq_len, self.bos_id, self.domain_id = tokens, seq_len, bos_id, domain_id

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        t = self.seq_len
        window = np.asarray(self.tokens[i * t: i * t + t + 1], np.int32)
        targets = window[1:]
        mask = np.ones([t], np.float32) if self.bos_id is None else (targets != self.bos_id).astype(np.float32)
        out = {"input_ids": window[:-1], "targets": targets, "loss_mask": mask}
        if self.domain_id is not None:
            out["domain"] = np.int32(self.domain_id)
        return out


def _sequences(tokens: np.ndarray, seq_len: int, seed: int, *, shuffle: bool, num_epochs: int | None,
               bos_id: int | None, domain_id: int | None = None, name: str = "") -> grain.MapDataset:
    n = num_sequences(len(tokens), seq_len)
    if n == 0:
        raise ValueError(f"{name or 'text'}: {len(tokens)} tokens, fewer than one sequence of {seq_len} + 1")
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # a shuffled parent is re-permuted every epoch
    return ds.map(PackedSequence(tokens, seq_len, bos_id, domain_id))


def _batched(ds: grain.MapDataset, batch_size: int) -> grain.IterDataset:
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size)
    return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)


# ------------------------------------------------------------------------------------------ datasets
def lm_dataset(texts_or_corpus: TextSource, domain: str | None, split: str, tokenizer, seq_len: int,
               batch_size: int, seed: int, *, shuffle: bool = True, num_epochs: int | None = None,
               bos: bool = True) -> grain.IterDataset:
    """Packed language-model batches of one domain (see the module docstring for the packing).

    Args:
      texts_or_corpus: a :class:`Corpus`, a corpus folder, or a list of document strings.
      domain, split: which corpus split (ignored for a list of texts).
      num_epochs: None repeats forever; 1 is one pass (the last partial batch is dropped).
    Returns:
      a grain ``IterDataset``; ``iter()`` of it yields dicts ``input_ids`` int32[B, T], ``targets``
      int32[B, T], ``loss_mask`` float32[B, T] with B = batch_size, T = seq_len, and supports
      ``get_state()`` / ``set_state()``.
    """
    tokens = domain_tokens(texts_or_corpus, domain, split, tokenizer, bos=bos)
    ds = _sequences(tokens, seq_len, seed, shuffle=shuffle, num_epochs=num_epochs,
                    bos_id=tokenizer.bos_id if bos else None, name=f"{domain}/{split}")
    return _batched(ds, batch_size)


def mixed_dataset(source: Corpus | str | os.PathLike | Mapping[str, Sequence[str]], tokenizer, seq_len: int,
                  batch_size: int, seed: int, *, split: str = "train", domains: Sequence[str] | None = None,
                  weights: Sequence[float] | Mapping[str, float] | None = None, shuffle: bool = True,
                  num_epochs: int | None = None, bos: bool = True) -> grain.IterDataset:
    """All domains interleaved, each sequence tagged with its domain id (the expert-tuning stream).

    Each domain is packed and shuffled on its own (seed ``seed + domain id``) and the domains are mixed
    by ``weights`` (default: proportional to their number of sequences, i.e. the natural mixture; with
    ``num_epochs=1`` one pass then sees about every sequence once).

    Args:
      source: a :class:`Corpus` / corpus folder, or ``{domain: [texts]}``.
      domains: subset of the domains; ids stay the domain's index in the full corpus domain list.
    Returns:
      a grain ``IterDataset`` of dicts ``input_ids`` int32[B, T], ``targets`` int32[B, T],
      ``loss_mask`` float32[B, T], ``domain`` int32[B].
    """
    if isinstance(source, Mapping):
        all_domains = list(source)
        def stream(d):
            return tokenize_stream(source[d], tokenizer, bos=bos)
    else:
        corpus = load_corpus(source)
        all_domains = corpus.domains
        def stream(d):
            return domain_tokens(corpus, d, split, tokenizer, bos=bos)
    domains = list(domains) if domains else all_domains
    unknown = [d for d in domains if d not in all_domains]
    if unknown:
        raise KeyError(f"unknown domain(s) {unknown}; available: {all_domains}")
    parts, sizes = [], []
    for d in domains:
        tokens = stream(d)
        did = all_domains.index(d)
        parts.append(_sequences(tokens, seq_len, seed + did, shuffle=shuffle, num_epochs=num_epochs,
                                bos_id=tokenizer.bos_id if bos else None, domain_id=did, name=f"{d}/{split}"))
        sizes.append(num_sequences(len(tokens), seq_len))
    if weights is None:
        w = [float(s) for s in sizes]
    elif isinstance(weights, Mapping):
        w = [float(weights[d]) for d in domains]
    else:
        w = [float(x) for x in weights]
        if len(w) != len(domains):
            raise ValueError(f"{len(w)} weights for {len(domains)} domains {domains}")
    return _batched(grain.MapDataset.mix(parts, w), batch_size)

