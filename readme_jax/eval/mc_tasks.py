"""Multiple-choice items: the MMLU CSV reader and the built-in continuation task from a corpus.

    items = mmlu_items("data/mmlu", k_shot=5)                       # MMLU's data/{dev,test}/*.csv
    items = builtin_items(corpus, tokenizer, items_per_domain=40, context_tokens=64,
                          continuation_tokens=24, seed=0)           # from held-out text, chance 25%

Both return :class:`MCItem` lists that :mod:`readme_jax.eval.multiple_choice` scores.

MMLU prompt (Hendrycks et al. / lm-evaluation-harness)::

    The following are multiple choice questions (with answers) about {subject, _ -> space}.\\n\\n
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}\\n\\n      (k dev rows, first k)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:                   (the test row)

with choices ``" A"``, ``" B"``, ``" C"``, ``" D"``.

Built-in task, per domain (index ``d`` in ``corpus.domains``): the held-out stream ``encode(doc) + [eos]``
over the documents in file order (as :func:`readme_jax.eval.perplexity.heldout_windows`) is cut into
``P = len(stream) // L`` non-overlapping passages of ``L = context_tokens + continuation_tokens`` tokens.
With ``rng = np.random.default_rng([seed, d])``: ``items_per_domain`` distinct passages are drawn; for each
(in that order) 3 distractor passages among the other ``P - 1``, then the answer position in ``[0, 4)``.
An item's context is ``decode`` of its passage's first ``context_tokens`` tokens; every choice is ``decode``
of a passage's last ``continuation_tokens`` tokens (its own for the answer, the distractors' otherwise).
A passage may cross a document boundary; its eos is decoded as the tokenizer writes it (``<|endoftext|>``
for SmolLM2's, which encodes back to the eos id).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from readme_jax.data.corpus import Corpus, load_corpus

LETTERS = ("A", "B", "C", "D")
MMLU_CHOICES = tuple(f" {c}" for c in LETTERS)
MMLU_COLUMNS = "question, A, B, C, D, answer letter"


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: score ``context + choices[c]`` for every c; ``choices[answer]`` is right.

    ``group``: the subject (MMLU) or domain (built-in task) the item is summarised under.
    """

    context: str
    choices: tuple[str, ...]
    answer: int
    group: str

    def __post_init__(self):
        if len(self.choices) < 2:
            raise ValueError(f"MCItem needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"MCItem answer {self.answer} out of range for {len(self.choices)} choices")


# ------------------------------------------------------------------------------------------- MMLU
def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_mmlu_question(row: Sequence[str], answer: str | None = None) -> str:
    """``{question}\\nA. ..\\nD. ..\\nAnswer:`` plus ``" {answer}\\n\\n"`` for a few-shot example."""
    text = row[0] + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text if answer is None else f"{text} {answer}\n\n"


def read_mmlu_csv(path: Path) -> list[tuple[list[str], str]]:
    """Rows of one MMLU CSV (no header) as ``([question, A, B, C, D], letter)``; ValueError on a bad row."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            for i, row in enumerate(reader, 1):
                if not row:
                    continue
                if len(row) != 6:
                    raise ValueError(f"{path}: row {i} (line {reader.line_num}) has {len(row)} columns, "
                                     f"expected 6 ({MMLU_COLUMNS})")
                letter = row[5].strip()
                if letter not in LETTERS:
                    raise ValueError(f"{path}: row {i} (line {reader.line_num}) has answer {row[5]!r}, "
                                     f"expected one of {'/'.join(LETTERS)}")
                rows.append((row[:5], letter))
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return rows


def mmlu_dirs(root: str | Path) -> tuple[Path, Path]:
    """``(test_dir, dev_dir)``: ``root/test`` and ``root/dev`` when ``root/test`` exists, else root twice."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder (expected MMLU's data folder with <subject>_test.csv "
                         "files, directly or under test/ and dev/)")
    if (root / "test").is_dir():
        return root / "test", root / "dev"
    return root, root


def mmlu_items(root: str | Path, *, k_shot: int = 5, subjects: Sequence[str] | None = None) -> list[MCItem]:
    """MMLU items of every subject (sorted by name) or of ``subjects``, in test-file order.

    ``root`` holds ``<subject>_test.csv`` / ``<subject>_dev.csv`` directly or under ``test/`` / ``dev/``;
    the k-shot examples are the first ``k_shot`` rows of the subject's dev file (not read when k_shot=0).
    """
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    test_dir, dev_dir = mmlu_dirs(root)
    found = sorted(p.name[:-len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not found:
        raise ValueError(f"{test_dir}: no <subject>_test.csv files")
    missing = sorted(set(subjects or ()) - set(found))
    if missing:
        raise ValueError(f"{test_dir}: no test file for subject(s) {missing}; subjects: {found}")
    items = []
    for subject in subjects or found:
        prompt = ("The following are multiple choice questions (with answers) about "
                  f"{format_subject(subject)}.\n\n")
        if k_shot:
            dev = dev_dir / f"{subject}_dev.csv"
            if not dev.is_file():
                raise ValueError(f"{dev}: missing (needed for {k_shot}-shot examples; use k_shot=0 without it)")
            shots = read_mmlu_csv(dev)
            if len(shots) < k_shot:
                raise ValueError(f"{dev}: {len(shots)} rows, fewer than k_shot={k_shot}")
            prompt += "".join(format_mmlu_question(row, letter) for row, letter in shots[:k_shot])
        test = test_dir / f"{subject}_test.csv"
        for row, letter in read_mmlu_csv(test):
            items.append(MCItem(prompt + format_mmlu_question(row), MMLU_CHOICES, LETTERS.index(letter), subject))
    return items


# --------------------------------------------------------------------------------------- built-in
def heldout_stream(corpus: Corpus, domain: str, tokenizer) -> np.ndarray:
    """int32[S]: ``encode(doc) + [eos]`` over the domain's held-out documents in file order."""
    stream: list[int] = []
    for text in corpus.texts(domain, "heldout"):
        stream += tokenizer.encode(text, bos=False, eos=False)
        stream.append(tokenizer.eos_id)
    return np.asarray(stream, np.int32)


def builtin_items(corpus: Corpus | str | Path, tokenizer, *, items_per_domain: int = 40,
                  context_tokens: int = 64, continuation_tokens: int = 24, seed: int = 0,
                  domains: Sequence[str] | None = None) -> list[MCItem]:
    """The built-in 4-way continuation task (see the module docstring), ``items_per_domain`` per domain.

    Deterministic in (corpus, tokenizer, sizes, seed); a domain's items do not depend on which other
    domains are asked for. Raises ValueError when a domain has fewer than ``max(items_per_domain, 4)``
    passages.
    """
    if min(items_per_domain, context_tokens, continuation_tokens) < 1:
        raise ValueError("items_per_domain, context_tokens and continuation_tokens must be >= 1, got "
                         f"{items_per_domain}, {context_tokens}, {continuation_tokens}")
    corpus = load_corpus(corpus)
    length = context_tokens + continuation_tokens
    items = []
    for domain in domains or corpus.domains:
        if domain not in corpus.domains:
            raise ValueError(f"{corpus.root}: no domain {domain!r}; domains: {corpus.domains}")
        stream = heldout_stream(corpus, domain, tokenizer)
        n_passages = len(stream) // length
        need = max(items_per_domain, 4)
        if n_passages < need:
            raise ValueError(f"{corpus.path(domain, 'heldout')}: {len(stream)} tokens make {n_passages} "
                             f"passages of {context_tokens} + {continuation_tokens} tokens, fewer than the "
                             f"{need} needed; lower items_per_domain or the token counts")
        passages = stream[:n_passages * length].reshape(n_passages, length)
        rng = np.random.default_rng([seed, corpus.domains.index(domain)])
        chosen = rng.choice(n_passages, size=items_per_domain, replace=False)
        for p in chosen:
            others = rng.choice(n_passages - 1, size=3, replace=False)
            others = others + (others >= p)  # skip passage p itself
            position = int(rng.integers(4))
            conts = [tokenizer.decode(passages[q, context_tokens:].tolist()) for q in others]
            conts.insert(position, tokenizer.decode(passages[p, context_tokens:].tolist()))
            items.append(MCItem(tokenizer.decode(passages[p, :context_tokens].tolist()), tuple(conts),
                                position, domain))
    return items
