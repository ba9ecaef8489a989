"""glibc's malloc on transparent huge pages for the training CLIs' processes (``python -m readme_jax.train`` and
``python -m readme_jax.science``: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

XLA CPU allocates each step's large buffers afresh (a SmolLM2 expert step: ~4 GB of residuals, gradients and
logit chunks), and glibc serves allocations over its mmap threshold with fresh mappings whose 4 KiB pages
fault in (and are zeroed) one by one on first touch. With the tunable, glibc asks the kernel for huge pages
(``madvise(MADV_HUGEPAGE)``): measured on the SmolLM2 expert step (4 x 512 tokens, 2 cores) 10.9-11.3 s
instead of 12.0-12.5 s, and its compiles too. Tunables are read once at process start, so the CLI re-executes
itself with the variable set (same pid, same arguments) before importing anything heavy; it does nothing when
``GLIBC_TUNABLES`` is already set (the user's choice wins), with ``READMEJAX_HUGE_PAGES=0``, off Linux, on a
libc other than glibc >= 2.35, or when transparent huge pages are off (``never``).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "READMEJAX_HUGE_PAGES"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def wanted(environ=os.environ) -> bool:
    """Whether this process should re-execute itself with :data:`TUNABLE`."""
    if environ.get("GLIBC_TUNABLES") is not None or environ.get(OPT_OUT) == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return False
        return "[never]" not in _THP.read_text()
    except (OSError, ValueError):
        return False


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with ``GLIBC_TUNABLES`` = :data:`TUNABLE` when
    :func:`wanted`; returns only when it is not."""
    if wanted():
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], {**os.environ, "GLIBC_TUNABLES": TUNABLE})
