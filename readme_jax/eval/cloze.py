"""A cloze set of facts the dense parent answers: capitals, opposites, simple arithmetic, famous lines.

    items = load_items()                                  # the committed set (eval/data/cloze_facts.json)
    r = score_cloze(model, tokenizer, items)              # {"answered": n, "items": m, "outputs": [...], ...}

Protocol: a prompt is continued greedily (plain text, the tokenizer's default BOS, no chat template) for
``MAX_NEW_TOKENS = 8`` tokens; an item counts as answered when one of its answers appears in the decoded
continuation as a whole word, case-insensitive (``\\bparis\\b`` in " Paris."; "5" is not found in " 15").

The set is built once from :func:`candidates` (hand-written facts plus arithmetic drawn with the seed) by
keeping the items the dense parent answers, and committed before any Read-ME output is looked at::

    python -m readme_jax.eval.cloze build --model smollm2 --out readme_jax/eval/data/cloze_facts.json

A model's result is then "kept n of m": of the m facts its parent answers, the n it still answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from readme_jax.atomic import atomic_write_json

MAX_NEW_TOKENS = 8
ITEMS_PATH = Path(__file__).resolve().parent / "data" / "cloze_facts.json"
FORMAT = 1

CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Russia", "Moscow"), ("England", "London"), ("the United Kingdom", "London"), ("China", "Beijing"),
            ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Canada", "Ottawa"),
            ("Australia", "Canberra"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
            ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("the United States", "Washington"),
            ("Turkey", "Ankara"))
OPPOSITES = (("hot", ("cold",)), ("up", ("down",)), ("black", ("white",)), ("day", ("night",)),
             ("good", ("bad", "evil")), ("big", ("small", "little")), ("fast", ("slow",)), ("open", ("closed", "close",
             "shut")), ("light", ("dark", "heavy")), ("old", ("new", "young")), ("happy", ("sad", "unhappy")),
             ("left", ("right",)), ("wet", ("dry",)), ("true", ("false",)), ("love", ("hate",)),
             ("rich", ("poor",)), ("early", ("late",)), ("win", ("lose",)), ("high", ("low",)),
             ("yes", ("no",)))
FAMOUS_LINES = (("To be, or not to be, that is the", "question"), ("Four score and seven years", "ago"),
                ("I think, therefore I", "am"), ("All the world's a", "stage"), ("Twinkle, twinkle, little", "star"),
                ("Once upon a", "time"), ("The quick brown fox jumps over the lazy", "dog"),
                ("Houston, we have a", "problem"), ("May the Force be with", "you"),
                ("That's one small step for man, one giant leap for", "mankind"),
                ("Shall I compare thee to a summer's", "day"), ("A rose by any other name would smell as", "sweet"),
                ("Friends, Romans, countrymen, lend me your", "ears"), ("Now is the winter of our", "discontent"),
                ("It was the best of times, it was the worst of", "times"),
                ("In the beginning God created the heaven and the", "earth"), ("Elementary, my dear", "Watson"),
                ("Mary had a little", "lamb"), ("Humpty Dumpty sat on a", "wall"), ("Jack and Jill went up the", "hill"),
                ("An apple a day keeps the", "doctor"), ("Actions speak louder than", "words"),
                ("The early bird catches the", "worm"), ("Romeo, Romeo, wherefore art thou", "Romeo"))
ARITHMETIC = 20
ARITHMETIC_SHOTS = "10 + 5 = 15\n7 - 3 = 4\n6 * 2 = 12\n"   # worked examples before each drawn question


@dataclasses.dataclass(frozen=True)
class ClozeItem:
    kind: str
    prompt: str
    answers: tuple[str, ...]

    def __post_init__(self):
        if not self.prompt or not self.answers or not all(a.strip() for a in self.answers):
            raise ValueError(f"cloze item {self.prompt!r}: needs a prompt and non-empty answers")

    def to_json(self) -> dict:
        return {"kind": self.kind, "prompt": self.prompt, "answers": list(self.answers)}

    @classmethod
    def from_json(cls, d: dict) -> "ClozeItem":
        return cls(str(d["kind"]), str(d["prompt"]), tuple(str(a) for a in d["answers"]))


def candidates(seed: int = 0) -> list[ClozeItem]:
    """The candidate facts: capitals, opposites, ``ARITHMETIC`` sums/differences/products of small numbers drawn
    with ``np.random.default_rng(seed)`` (after three worked examples), famous lines; in that order."""
    items = [ClozeItem("capital", f"The capital of {c} is", (a,)) for c, a in CAPITALS]
    items += [ClozeItem("opposite", f"The opposite of {w} is", ans) for w, ans in OPPOSITES]
    rng = np.random.default_rng(seed)
    for _ in range(ARITHMETIC):
        op = ("+", "-", "*")[int(rng.integers(3))]
        a, b = int(rng.integers(2, 13)), int(rng.integers(2, 13))
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        items.append(ClozeItem("arithmetic", f"{ARITHMETIC_SHOTS}{a} {op} {b} =", (str(value),)))
    items += [ClozeItem("famous line", p, (a,)) for p, a in FAMOUS_LINES]
    return items


def answered(item: ClozeItem, output: str) -> bool:
    """Whether one of ``item.answers`` appears in ``output`` as a whole word (case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(a.strip())}(?!\w)", output, re.IGNORECASE) for a in item.answers)


def continuations(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 16,
                  desc: str | None = None) -> list[str]:
    """Greedy ``MAX_NEW_TOKENS``-token continuation of each prompt, in batches of exactly ``batch_size`` (the
    last filled with copies of the first prompt), so one compile per prompt-length bucket."""
    from readme_jax.generation import generate
    outs: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=desc is None, unit="batch"):
        chunk = list(prompts[i:i + batch_size])
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))
        outs += generate(model, tokenizer, filled, MAX_NEW_TOKENS, temperature=0.0)[:len(chunk)]
    return outs


def score_cloze(model, tokenizer, items: Sequence[ClozeItem], *, batch_size: int = 16,
                desc: str | None = None) -> dict:
    """``{"answered": n, "items": m, "rate": n / m, "outputs": [str], "correct": [bool]}``."""
    if not items:
        raise ValueError("cloze: no items to score")
    outputs = continuations(model, tokenizer, [it.prompt for it in items], batch_size=batch_size, desc=desc)
    correct = [answered(it, out) for it, out in zip(items, outputs)]
    return {"answered": int(sum(correct)), "items": len(items), "rate": sum(correct) / len(items),
            "outputs": outputs, "correct": correct}


def load_items(path: str | Path | None = None) -> list[ClozeItem]:
    """The kept items of a set written by ``build`` (default: the committed one)."""
    path = Path(path) if path is not None else ITEMS_PATH
    if not path.is_file():
        raise ValueError(f"{path}: no such cloze set (build one with python -m readme_jax.eval.cloze build)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return [ClozeItem.from_json(d) for d in data["items"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a cloze set ({e})") from None


def build_set(model, tokenizer, *, seed: int = 0, source: str = "", batch_size: int = 16,
              progress: bool = True) -> dict:
    """The record ``build`` writes: every candidate with the parent's continuation; ``items``: the kept ones."""
    cands = candidates(seed)
    r = score_cloze(model, tokenizer, cands, batch_size=batch_size, desc="cloze candidates" if progress else None)
    rows = [{**it.to_json(), "parent_output": out} for it, out in zip(cands, r["outputs"])]
    kept = [row for row, ok in zip(rows, r["correct"]) if ok]
    return {"format": FORMAT, "parent": source, "seed": seed, "max_new_tokens": MAX_NEW_TOKENS,
            "candidates": len(cands), "kept": len(kept), "items": kept,
            "dropped": [row for row, ok in zip(rows, r["correct"]) if not ok]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m readme_jax.eval.cloze", description="Build or score the cloze set.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="keep the candidates the parent answers; write the set")
    b.add_argument("--model", required=True, help="the dense parent: 'smollm2' or anything load_pretrained loads")
    b.add_argument("--out", type=Path, default=ITEMS_PATH)
    b.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="kept n of m for a model")
    s.add_argument("--model", required=True)
    s.add_argument("--items", type=Path, default=ITEMS_PATH)
    args = p.parse_args(argv)
    try:
        from readme_jax.eval.model_specs import load_model
        source, model, tokenizer = load_model(args.model)
        if args.cmd == "build":
            record = build_set(model, tokenizer, seed=args.seed, source=Path(source).name)
            atomic_write_json(args.out, record, indent=1)
            print(f"kept {record['kept']} of {record['candidates']} candidates -> {args.out}")
        else:
            r = score_cloze(model, tokenizer, load_items(args.items), desc="cloze")
            print(f"kept {r['answered']} of {r['items']} ({100 * r['rate']:.1f}%)")
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
