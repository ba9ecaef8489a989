"""Offline stand-ins for the tiny config: a small multi-domain text folder and a BPE tokenizer trained on it.

The texts are a user-style corpus folder (``SRC/<domain>/*.txt``, the layout ``build_corpus(from_dir=)``
reads). Each domain speaks its own made-up language: its own word list (from domain-specific syllables)
and a sparse bigram table (every word has 3 possible successors), plus a few words all domains share.
So the domains are separable from token ids alone (a router can learn them), the FFN channels the domains
use differ (extraction finds different experts), and an LM lowers its loss on them in a few steps.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

DOMAINS = ("alpha", "beta", "gamma")
_SYLLABLES = {
    "alpha": ["ka", "ro", "mi", "ta", "lu", "ve"],
    "beta": ["zor", "qui", "phe", "dax", "ny", "bel"],
    "gamma": ["sh", "oo", "tr", "ae", "gn", "ux"],
}
_SHARED = ["the", "and", "of", "to", "in", "is"]


def _words(rng: random.Random, syllables: Sequence[str], n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(out)


def _document(rng: random.Random, words: list[str], succ: dict[str, list[str]], chars: int) -> str:
    lines, line, w = [], [], rng.choice(words)
    size = 0
    while size < chars:
        line.append(w)
        size += len(w) + 1
        if rng.random() < 0.15:
            line.append(rng.choice(_SHARED))
        if len(line) >= 12:
            lines.append(" ".join(line) + ".")
            line = []
        w = rng.choice(succ[w])
    lines.append(" ".join(line) + ".")
    return "\n".join(lines) + "\n"


def write_texts(out: str | Path, *, domains: Sequence[str] = DOMAINS, docs_per_domain: int = 16,
                doc_chars: int = 1500, seed: int = 0) -> Path:
    """Write ``out/<domain>/doc_NN.txt`` (deterministic in ``seed``); returns ``out``."""
    out = Path(out)
    for d_index, domain in enumerate(domains):
        rng = random.Random(f"{seed}/{domain}")
        syl = _SYLLABLES.get(domain) or [chr(97 + (d_index * 5 + i) % 26) + "a" for i in range(6)]
        words = _words(rng, syl, 48)
        succ = {w: rng.sample(words, 3) for w in words}
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(docs_per_domain):
            (folder / f"doc_{i:02d}.txt").write_text(_document(rng, words, succ, doc_chars))
    return out


def train_tokenizer(texts_dir: str | Path, out: str | Path, vocab_size: int = 512):
    """A byte-level BPE (``<s>`` / ``</s>`` / ``<pad>`` specials) trained on ``texts_dir/**/*.txt``, saved to
    ``out`` (``tokenizer.json`` + ``tokenizer_config.json``) and loaded back with ``load_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from readme_jax.data.tokenizers import load_tokenizer

    files = sorted(str(p) for p in Path(texts_dir).rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{texts_dir}: no .txt files to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": false}\n')
    return load_tokenizer(out)
