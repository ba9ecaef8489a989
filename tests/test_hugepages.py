"""readme_jax/hugepages.py: the CLIs re-execute themselves with glibc's malloc on huge pages, once, keeping
the command line, and leave a user's own GLIBC_TUNABLES (or the opt-out) alone."""

import os
import subprocess
import sys

import pytest

from readme_jax import hugepages

CODE = ("import os; from readme_jax.hugepages import reexec_with_huge_pages; reexec_with_huge_pages(); "
        "print(os.environ.get('GLIBC_TUNABLES'), os.getpid())")


def _run(**env):
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)},
                              **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.subprocess
def test_reexec_sets_the_tunable_once_where_wanted():
    wanted = hugepages.wanted({})
    tunables, _ = _run()
    assert tunables == (hugepages.TUNABLE if wanted else "None")


@pytest.mark.subprocess
def test_a_users_tunables_and_the_opt_out_are_kept():
    assert _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] == "glibc.malloc.arena_max=2"
    assert _run(**{hugepages.OPT_OUT: "0"})[0] == "None"


def test_wanted_reads_the_environment():
    assert not hugepages.wanted({"GLIBC_TUNABLES": "x=1"})
    assert not hugepages.wanted({hugepages.OPT_OUT: "0"})
