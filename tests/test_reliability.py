"""Reliability of the training pipeline (issue 12): one run per folder, every bad value refused before work
starts, evaluations that follow their config, a full disk ending in one line and a resumable folder, and
sampling values refused by every entry point. Each mutating test works on a copy of the shared tiny run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from readme_jax.train.checkpointing import PhaseCheckpoints
from readme_jax.train.lock import LOCK_FILE
from tests.tiny_run import REPO, cli_env, step_and_eval_records, train_cli


def _canonical(records: list[dict]) -> list[dict]:
    """Step / eval records in a fixed order (a partial rerun appends what it redoes at the end)."""
    return sorted(records, key=lambda r: (r["event"], r.get("phase", ""), r.get("step", 0), r.get("tag", "")))


def _redo_last_round(tiny_run, tmp_path: Path) -> Path:
    """A copy of the finished tiny run without expert_1, the final evaluation and the export."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    for p in ("checkpoints/expert_1", "export"):
        shutil.rmtree(run_dir / p)
    (run_dir / "eval" / "final.json").unlink()
    return run_dir


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_second_run_on_a_folder_is_refused_and_the_first_finishes_as_alone(tiny_run, tmp_path):
    ref, run_dir = tiny_run[0], _redo_last_round(tiny_run, tmp_path)
    cmd = [sys.executable, "-m", "tests.faults", "--hold-at", "expert_1:1", "--", "--config", "tiny",
           "--run-dir", str(run_dir)]
    first = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:                       # it holds the folder, paused after expert_1 step 1
            if line.strip() == "HOLDING":
                break
        second = train_cli(run_dir)
        assert second.returncode == 2
        msg = _one_error_line(second.stderr)
        assert f"RunLockError: {run_dir}: in use by another run (pid {first.pid})" in msg
        (run_dir / ".release").touch()
        out, err = first.communicate(timeout=600)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, err[-3000:]
    (run_dir / ".release").unlink()
    steps = [r for r in step_and_eval_records(run_dir) if r["event"] == "step"]
    assert len(steps) == len({(r["phase"], r["step"]) for r in steps})        # no duplicated step records
    assert _canonical(step_and_eval_records(run_dir)) == _canonical(step_and_eval_records(ref))
    # the lock died with its holder: the same folder runs again at once
    assert (run_dir / LOCK_FILE).is_file() and train_cli(run_dir, "--stage", "plots").returncode == 0


@pytest.mark.parametrize("override, message", [
    ("model.random.hidden_size=0", "model.random.hidden_size: expected a positive integer, got 0"),
    ("corpus.domains=[alpha,zeta]", "corpus.domains=['alpha', 'zeta']: unknown domain(s) ['zeta']; the synthetic "
                                    "corpus has ['alpha', 'beta', 'gamma']"),
    ("extract.keep_ratio=0.005", "extract.keep_ratio=0.005 keeps 0 of the F=64"),
    ("extract.keep_ratio=1", "no expert has channels of its own"),
    ("extract.num_experts=4", "extract.num_experts=4 but the corpus has 3 domains"),
    ("router.n_heads=0", "router.n_heads: expected a positive integer, got 0"),
    ("router.rope_theta=abc", "router.rope_theta: expected a number, got 'abc'"),
    ("train.router_lr=inf", "train.router_lr: expected a finite positive learning rate, got inf"),
    ("train.seq_len=300", "train.seq_len=300 is longer than the dense model's context"),
    ("eval.routing_tokens=0", "eval.routing_tokens: expected a positive integer, got 0"),
    ("mesh.data=3", "rows per micro-batch is not divisible by the 3 devices of the mesh"),
    ("name=a/b", "name: expected a non-empty name usable as a folder"),
])
def test_a_bad_value_of_every_section_is_refused_before_anything_is_written(override, message, tmp_path, capsys):
    from readme_jax.train.__main__ import main
    fresh = tmp_path / "fresh"
    assert main(["--config", "tiny", "--run-dir", str(fresh), override]) == 2
    assert message in capsys.readouterr().err
    assert not fresh.exists()                            # no stage output, no config.yaml, not even the folder


def test_bad_values_leave_a_finished_folder_as_it_was_and_it_still_takes_the_good_config(tiny_run, tmp_path, capsys):
    from readme_jax.train.__main__ import main
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "stages.json", "metrics.jsonl")}
    for bad in ("router.dim=abc", "train.expert_lr=inf", "extract.keep_ratio=1"):
        assert main(["--config", "tiny", "--run-dir", str(run_dir), bad]) == 2
        assert {p: (run_dir / p).read_bytes() for p in before} == before
    # a training change is refused, naming the stages and keys, before anything is written
    assert main(["--config", "tiny", "--run-dir", str(run_dir), "train.expert_lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "stage 'rounds': train.expert_lr" in err and "StaleRunError" in err
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    assert main(["--config", "tiny", "--run-dir", str(run_dir), "--stage", "export"]) == 0


def test_eval_only_change_re_evaluates_from_the_checkpoints(tiny_run, tmp_path, capsys):
    from readme_jax.train.__main__ import main
    ref, run_dir = tiny_run[0], tmp_path / "run"
    shutil.copytree(ref, run_dir)
    ckpt = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    (run_dir / "eval" / "router_0.json").unlink()
    # the same config: only the missing evaluation runs, rebuilt from router_0's checkpoint: the same numbers
    assert main(["--config", "tiny", "--run-dir", str(run_dir)]) == 0
    router_0 = (json.loads((d / "eval/router_0.json").read_text()) for d in (run_dir, ref))
    assert next(router_0) == next(router_0)
    # an evaluation setting changes: every evaluation is redone with it, nothing is retrained
    assert main(["--config", "tiny", "--run-dir", str(run_dir), "eval.max_tokens=128"]) == 0
    out = capsys.readouterr()
    assert "[final_eval] settings changed (eval.max_tokens): re-running" in out.out + out.err
    for tag in ("dense", "router_0", "expert_0", "final"):
        new, old = (json.loads((d / "eval" / f"{tag}.json").read_text()) for d in (run_dir, ref))
        assert {d: v["tokens"] for d, v in new["ppl"].items()} == {d: 128 for d in new["ppl"]}, tag
        assert new["ppl"] != old["ppl"], tag
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*") if p.is_file()} == ckpt
    assert json.loads((run_dir / "stages.json").read_text())["final_eval"]["eval.max_tokens"] == 128


def test_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes(tiny_run, tmp_path):
    ref, run_dir = tiny_run[0], _redo_last_round(tiny_run, tmp_path)
    full = train_cli(run_dir, module="tests.faults", pre=("--disk-full-at", "expert_1:4", "--"))
    assert full.returncode == 2
    msg = _one_error_line(full.stderr)
    assert "CheckpointError:" in msg and "checkpoints/expert_1/4: writing the checkpoint failed (No space left on " \
                                         "device: checkpoints/expert_1/4)" in msg
    assert "the last good checkpoint is step 2" in msg
    ck = PhaseCheckpoints(run_dir / "checkpoints" / "expert_1")
    assert ck.latest_step() == 2 and ck.meta()["step"] == 2 and not ck.is_done()
    assert not list((run_dir / "checkpoints" / "expert_1").glob("*tmp*"))
    resumed = train_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[expert_1] resuming at step 2/6" in resumed.stdout + resumed.stderr
    assert _canonical(step_and_eval_records(run_dir)) == _canonical(step_and_eval_records(ref))


def test_environment_faults_are_one_line(tmp_path, capsys):
    from readme_jax.data.corpus import main as corpus_main
    from readme_jax.train.__main__ import main
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--config", "tiny", "--run-dir", str(a_file)]) == 2
    assert f"RunLockError: {a_file}: --run-dir is a file" in capsys.readouterr().err
    for d in ("a", "b"):
        (tmp_path / "src" / d).mkdir(parents=True)
        (tmp_path / "src" / d / "doc.txt").write_text("some text. " * 50)
    for tok in (tmp_path / "absent", a_file):
        assert corpus_main(["build", str(tmp_path / "out"), "--tokenizer", str(tok),
                            "--from-dir", str(tmp_path / "src")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tok}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


class _VocabOnly:
    """As much of a tokenizer as parsing a request of token ids needs."""
    vocab_size = 64


def test_sampling_values_are_refused_by_library_cli_and_server():
    from readme_jax.errors import SamplingError
    from readme_jax.generate import main as generate_main
    from readme_jax.generation import generate_ids
    from readme_jax.serve.protocol import parse_request
    from readme_jax.errors import APIError
    bad = {"temperature": -1.0, "top_p": 1.5}
    for field, value in bad.items():
        with pytest.raises(SamplingError, match=f"^{field}: expected"):
            generate_ids(None, [[1, 2]], 4, **{field: value})        # refused before the model is touched
        flag = "--" + field.replace("_", "-")
        assert generate_main(["--model", "absent", flag, str(value), "hi"]) == 2   # before the model loads
        with pytest.raises(APIError) as e:
            parse_request("completion", {"model": "m", "prompt": [1, 2], field: value}, _VocabOnly(), model_name="m",
                          max_model_len=64, default_max_tokens=4)
        assert e.value.status == 400 and e.value.param == field


def test_priority_field_is_parsed_and_checked():
    from readme_jax.errors import APIError
    from readme_jax.serve.protocol import parse_request
    parse = lambda **f: parse_request("completion", {"model": "m", "prompt": [1, 2], **f}, _VocabOnly(),  # noqa: E731
                                      model_name="m", max_model_len=64, default_max_tokens=4)
    assert parse().priority == 0 and parse(priority=None).priority == 0 and parse(priority=-5).priority == -5
    for bad in ("high", 1.5, True, 2**40):
        with pytest.raises(APIError) as e:
            parse(priority=bad)
        assert e.value.status == 400 and e.value.param == "priority"


def test_convert_removes_its_leftovers_warns_of_unused_tensors_and_a_full_disk_is_one_line(tmp_path, monkeypatch,
                                                                                          capsys):
    import errno
    import os

    import numpy as np

    from readme_jax.convert import hf_export
    from readme_jax.convert.__main__ import main as convert_main
    from readme_jax.convert.assemble import UnusedTensorsWarning
    from readme_jax.convert.safetensors_io import save_safetensors
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    from tests.tiny_models import random_model
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    src = tmp_path / "src"
    src.mkdir()
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    save_safetensors({**hf_export.hf_tensors(random_model(lambda r: Llama(cfg, rngs=r))), **extra}, src)
    (src / "config.json").write_text(json.dumps(cfg.to_hf()))
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-killed").mkdir()                    # an earlier convert to OUT, killed mid-write
    (tmp_path / ".out.old-killed").mkdir()
    with pytest.warns(UnusedTensorsWarning, match=r"1 tensor\(s\) the model does not use: "
                                                  r"model.layers.0.self_attn.rotary_emb.inv_freq"):
        assert convert_main([str(src), str(out)]) == 0
    assert (out / "config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    # the disk fills up while the HF shards are written: one line naming the file, nothing at OUT

    def full(tensors, directory, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "model.safetensors"))
    monkeypatch.setattr(hf_export, "save_safetensors", full)
    capsys.readouterr()
    assert convert_main([str(out), str(tmp_path / "hf"), "--to-hf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "model.safetensors" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_corpus_lists_the_files_it_skipped(tmp_path):
    from readme_jax.data.corpus import build_corpus, skipped_note
    from tests.test_corpus import ByteTokenizer
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        for i in range(4):
            (src / d / f"doc{i}.txt").write_text(f"{d} words {i} here. " * 100)
    (src / "a" / "empty.txt").write_text("  \n")
    (src / "a" / "loop").symlink_to(src / "a")                 # a folder linking to itself
    (src / "b" / "self.txt").symlink_to(src / "b" / "self.txt")  # a link to itself
    m = build_corpus(tmp_path / "out", ByteTokenizer(), from_dir=src, min_heldout_chars=200, heldout_fraction=0.1)
    assert m["domains"]["a"]["skipped"] == [{"file": "empty.txt", "reason": "empty file"},
                                            {"file": "loop", "reason": "symlink to a folder, not followed"}]
    assert m["domains"]["b"]["skipped"] == [{"file": "self.txt", "reason": "unreadable link (Too many levels of "
                                                                           "symbolic links)"}]
    assert skipped_note(m) == ("skipped source files (a 2, b 1): listed with the reason under "
                               "domains.<domain>.skipped in manifest.json")


@pytest.mark.subprocess
def test_compilation_cache_is_written_and_read_back_by_a_second_process(tmp_path):
    """``assets.enable_compilation_cache`` (what the train and serve CLIs call): a first process writes the
    compiled program under $READMEJAX_CACHE, a second one with the same program reads it back (a cache hit,
    no new entry); $READMEJAX_JIT_CACHE=0 writes nothing."""
    code = ("import logging, jax, jax.numpy as jnp\n"
            "from readme_jax.assets import enable_compilation_cache\n"
            "print(enable_compilation_cache(0.0))\n"
            "logging.basicConfig(level=logging.DEBUG, format='%(message)s')\n"
            "print(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))))\n")
    run = lambda **env: subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                       timeout=300, env=cli_env(READMEJAX_CACHE=str(tmp_path / "c"), **env))
    off = run(READMEJAX_JIT_CACHE="0")
    assert off.returncode == 0 and off.stdout.startswith("None"), off.stderr[-2000:]
    first = run(READMEJAX_JIT_CACHE="1")
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in (tmp_path / "c" / "jax_compilation_cache").iterdir())
    assert entries
    second = run(READMEJAX_JIT_CACHE="1")
    assert second.returncode == 0 and "cache hit" in second.stderr.lower(), second.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "c" / "jax_compilation_cache").iterdir()) == entries
