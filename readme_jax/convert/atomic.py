"""Write a directory atomically: build it in a hidden temp sibling, then ``os.replace`` it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from readme_jax.convert.errors import CheckpointError


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to ``out``; on success it becomes ``out``, on any error it is removed.

    ``out`` must not exist unless ``overwrite`` (then the old directory is replaced only after the new one
    is complete). A crash never leaves a half-written ``out``.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (expected a new output path)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
