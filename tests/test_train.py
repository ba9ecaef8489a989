"""Training half: config, losses (vs NumPy), frozen partitions, checkpoints, and the tiny pipeline end to end
(uninterrupted vs killed + diverged + resumed: same metrics), bad input, export -> load_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.config import Config, ConfigError, load_config
from readme_jax.train import losses

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ helpers
def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu", **extra)
    return env


def _train(run_dir: Path, *args: str, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "readme_jax.train", "--config", "tiny", "--run-dir", str(run_dir), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=600)


def _metrics(run_dir: Path) -> list[dict]:
    """Step and eval records without wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") in ("step", "eval"):
            r.pop("seconds", None)
            out.append(r)
    return out


def _np_graded(feat: np.ndarray, n: int) -> np.ndarray:
    desc = -np.sort(-feat, axis=-1)
    total = np.zeros_like(feat)
    for r in (n - 1, 4 * n // 5, 3 * n // 5, 2 * n // 5, n // 5):
        r = max(r, 1)
        total += feat > desc[..., r - 1:r]
    return total / (3.0 * n)


def _np_targets(feat: np.ndarray, specific: np.ndarray) -> np.ndarray:
    """feat [B, T, F], specific [E, F] -> dist [B, T, E] (PAPER.md, code form)."""
    n = int(specific[0].sum())
    dist = _np_graded(feat.astype(np.float64), n) @ specific.T.astype(np.float64)
    return (dist - dist.mean(-1, keepdims=True)) * 10.0


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_distill(logits, dist, mask):
    E = logits.shape[-1]
    logp = _np_log_softmax(logits.astype(np.float64))
    total = np.zeros(logits.shape[:-1])
    for d in dist:
        hard = np.eye(E)[d.argmax(-1)]
        tgt = 0.5 * hard + 0.5 / E
        soft = np.exp(_np_log_softmax(d))
        total += 0.75 * -(tgt * logp).sum(-1) + 0.25 * -(soft * logp).sum(-1)
    return (total * mask).sum() / mask.sum()


def _random_masks(E, L, F, keep, seed=0):
    from readme_jax.extract.masks import build_masks
    scores = np.random.default_rng(seed).random((E, L, F)).astype(np.float32)
    return build_masks(scores, keep)


def _tiny_dense(seed=0):
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    return Llama(cfg, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------------------- config
def test_default_config_is_default_yaml_and_all_configs_load():
    assert load_config(None) == load_config(REPO / "configs" / "default.yaml")
    tiny = load_config("tiny")
    assert tiny.model.source == "random-tiny" and tiny.name == "tiny"
    paper = load_config(REPO / "configs" / "llama2_7b_readme.yaml")
    t = paper.train
    assert (paper.extract.num_experts, t.rounds, t.router_steps, t.expert_steps) == (7, 8, 100, 200)
    assert (t.router_batch, t.expert_batch, t.seq_len, t.router_lr, t.expert_lr) == (64, 128, 4096, 5e-4, 5e-5)
    cfg = load_config("tiny", ["train.router_lr=1e-3", "train.rounds=3", "corpus.domains=[alpha,beta]",
                               "train.grad_clip=null", "eval.each_round=false"])
    assert cfg.train.router_lr == 1e-3 and cfg.train.rounds == 3 and cfg.corpus.domains == ("alpha", "beta")
    assert cfg.train.grad_clip is None and cfg.eval.each_round is False
    assert load_config(None, ["train.expert_lr=inf"]).train.expert_lr == float("inf")


@pytest.mark.parametrize("override, match", [
    ("extract.keep_ratio=0", r"extract.keep_ratio: expected a value in \(0, 1\], got 0"),
    ("extract.keep_ratio=1.5", r"extract.keep_ratio: expected a value in \(0, 1\], got 1.5"),
    ("train.rounds=two", r"train.rounds: expected an integer, got 'two'"),
    ("train.warmup=10", r"unknown key\(s\) \['train.warmup'\]"),
    ("trian.rounds=1", r"unknown section 'trian'"),
    ("router.width=3", r"unknown key\(s\) router"),
    ("train.expert_batch=3", r"train.expert_batch=3 is not a multiple of train.grad_accum=2"),
    ("train.router_lr=0", r"train.router_lr: expected a positive learning rate"),
    ("train.dtype=float64", r"train.dtype: expected one of"),
])
def test_bad_config_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_expert_count_must_match_domains():
    cfg = load_config("tiny", ["extract.num_experts=4"])
    with pytest.raises(ConfigError, match=r"extract.num_experts=4 but the corpus has 3 domains"):
        cfg.check_domains(["alpha", "beta", "gamma"])
    Config().check_domains(["a", "b"])  # unset: any count >= 2


def test_cli_bad_config_exits_with_message(tmp_path):
    proc = _train(tmp_path / "run", "extract.keep_ratio=0")
    assert proc.returncode == 2
    assert "extract.keep_ratio: expected a value in (0, 1], got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------- losses
def test_lm_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    from readme_jax.model.head_loss import nll_from_logits
    loss, count = losses.lm_loss(nll_from_logits(jnp.asarray(logits), jnp.asarray(targets)), jnp.asarray(mask))
    nll = -np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(count) == mask.sum()


def test_distill_loss_matches_numpy_on_random_arrays():
    rng = np.random.default_rng(1)
    E, L, B, T, F = 4, 3, 2, 6, 48
    masks = _random_masks(E, L, F, 0.5)
    specific = masks.specific                                           # [E, L, F]
    feat = rng.normal(size=(L, B, T, F)).astype(np.float32)
    dist = np.stack([np.asarray(losses.layer_targets(jnp.asarray(feat[l]), jnp.asarray(specific[:, l])))
                     for l in range(L)])
    ref = np.stack([_np_targets(feat[l], specific[:, l]) for l in range(L)])
    np.testing.assert_allclose(dist, ref, atol=1e-5)
    logits = rng.normal(size=(B, T, E)).astype(np.float32) * 3
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    got = float(losses.distill_loss(jnp.asarray(logits), jnp.asarray(dist), jnp.asarray(mask)))
    # the loss against the same dist (ties between experts are common in the graded targets; float32 rounding
    # may break them differently from float64, so the argmax is taken on one dist)
    np.testing.assert_allclose(got, _np_distill(logits, dist.astype(np.float64), mask), rtol=1e-5)
    acc = float(losses.router_accuracy(jnp.asarray(logits), jnp.asarray(dist), jnp.asarray(mask)))
    hit = logits.argmax(-1) == dist.sum(0).argmax(-1)
    np.testing.assert_allclose(acc, (hit * mask).sum() / mask.sum(), rtol=1e-6)


def test_graded_indicator_levels():
    feat = jnp.arange(20, dtype=jnp.float32)[None]                      # distinct values 0..19
    th = np.round(np.asarray(losses.graded_topn(feat, 10))[0] * 30, 4)   # x 3N
    # thresholds: 9th, 8th, 6th, 4th, 2nd largest -> the top channel clears all 5, the 2nd clears 4, ...
    assert th[19] == 5 and th[18] == 4 and th[17] == 4 and th[16] == 3 and th[12] == 1 and th[11] == 0


def test_rank_values_host_and_top_k_paths_agree_with_a_sort(monkeypatch):
    """The CPU path (NumPy partition via pure_callback, under jit and inside a scan) and the GPU/TPU path
    (lax.top_k) give the r-th largest values exactly."""
    feat = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4, 50)), jnp.float32)
    ranks = jnp.asarray([1, 7, 7, 20, 33], jnp.int32)
    want = -np.sort(-np.asarray(feat), axis=-1)[..., np.asarray(ranks) - 1]
    scanned = jax.jit(lambda f, r: jax.lax.scan(lambda c, x: (c, losses.rank_values(x, r, 40)), 0, f)[1])
    np.testing.assert_array_equal(scanned(feat, ranks), want)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(losses.rank_values(feat, ranks, 40), want)


def test_router_targets_from_dense_forward_match_numpy():
    dense = _tiny_dense()
    masks = _random_masks(3, 2, 40, 0.5, seed=3)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=(2, 7)), jnp.int32)
    dist = np.asarray(losses.router_targets(dense, ids, None, jnp.asarray(masks.specific)))
    from readme_jax.model.layers import swiglu_hidden

    def ffn(p, h):
        act = swiglu_hidden(h, p["w_gate"], p["w_up"])
        return act @ p["w_down"], act

    _, _, acts = dense.hidden_states(ids, ffn_fn=ffn)                  # [L, B, T, F]
    ref = np.stack([_np_targets(np.asarray(acts[l]), masks.specific[:, l]) for l in range(2)])
    assert dist.shape == (2, 2, 7, 3)
    np.testing.assert_allclose(dist, ref, atol=1e-4)


def test_routing_locality_counts():
    ids = np.array([[0, 0, 1, 1, 1], [2, 0, 2, 2, 0]])
    assert losses.routing_locality(ids) == (4, 8)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    assert losses.routing_locality(ids, mask) == (3, 7)


# ----------------------------------------------------------------------------- frozen partitions
def test_router_step_freezes_backbone_and_expert_step_freezes_router():
    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.model.router import RouterConfig
    from readme_jax.train import steps
    from readme_jax.train.optim import make_optimizer

    dense = _tiny_dense()
    masks = _random_masks(3, 2, 40, 0.5, seed=4)
    rcfg = RouterConfig(vocab_size=64, num_experts=3, dim=16, n_heads=2, mlp_dim=32, embed_rank=8)
    model = readme_from_dense(dense, masks, rcfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 64, size=(4, 32)), jnp.int32)
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    dist = losses.router_targets(dense, ids, None, jnp.asarray(masks.specific))          # [L, B, T, E]

    # router step (grad_accum=2) on precomputed targets: only the router changes, and its loss is the
    # distillation loss of (router logits, dist)
    gd, tr, frozen = steps.split_for(model, "router")
    tx = make_optimizer(1.0, 4)
    step = steps.make_router_step(gd, tx)
    micro = {"input_ids": steps.microbatches(ids, 2), "dist": steps.microbatches(jnp.swapaxes(dist, 0, 1), 2)}
    new_tr, _, m = step(tr, tx.init(tr), frozen, micro, jnp.float32(1e-2))
    host = steps.check_finite(m, phase="router_0", step=1)
    want = [float(losses.distill_loss(model.router(ids[i:i + 2]), dist[:, i:i + 2], jnp.ones((2, 32))))
            for i in (0, 2)]
    np.testing.assert_allclose(host["loss"], np.mean(want), rtol=1e-5)
    nnx.update(model, new_tr)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for k in ("tok", "attn", "experts"):
        jax.tree.map(np.testing.assert_array_equal, before[k], after[k])
    assert not np.array_equal(before["router"]["head"], after["router"]["head"])

    # expert step: the router stays bitwise, the backbone moves
    gd, tr, frozen = steps.split_for(model, "expert")
    step = steps.make_expert_step(gd, tx, num_experts=3)
    batch = {k: steps.microbatches(v, 1) for k, v in batch.items()}
    spare = jax.tree.map(jnp.copy, tr)                 # the step donates (consumes) its trainable state
    new_tr, _, m = step(tr, tx.init(tr), frozen, batch, jnp.float32(1e-2))
    host = steps.check_finite(m, phase="expert_0", step=1)
    assert abs(sum(host["load"]) - 1.0) < 1e-6
    nnx.update(model, new_tr)
    final = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, after["router"], final["router"])
    assert not np.array_equal(after["experts"]["w_up"], final["experts"]["w_up"])

    # a diverged update is refused with a clear message
    _, _, m = step(spare, tx.init(spare), frozen, batch, jnp.float32(np.inf))
    with pytest.raises(steps.TrainingDivergedError, match=r"expert_0, step 3: non-finite update_norm"):
        steps.check_finite(m, phase="expert_0", step=3)


def test_checkpoint_save_is_atomic_and_tmp_dirs_are_ignored(tmp_path):
    from readme_jax.train.checkpointing import CheckpointError, PhaseCheckpoints, remove_tmp_dirs
    params = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2))}}
    ck = PhaseCheckpoints(tmp_path / "router_0")
    ck.save(2, params, {"n": jnp.int32(3)}, {"done": False, "data_state": {"i": 1}})
    assert sorted(p.name for p in (tmp_path / "router_0").iterdir()) == ["2"]
    # a save killed half-way leaves only an orbax tmp folder: never the latest step
    (tmp_path / "router_0" / "4.orbax-checkpoint-tmp-123").mkdir()
    ck2 = PhaseCheckpoints(tmp_path / "router_0")
    assert ck2.latest_step() == 2
    got, opt, meta = ck2.restore(params, {"n": jnp.int32(0)})
    np.testing.assert_array_equal(got["b"]["c"], params["b"]["c"])
    assert int(opt["n"]) == 3 and meta["data_state"] == {"i": 1} and meta["step"] == 2
    assert [p.name for p in remove_tmp_dirs(tmp_path / "router_0")] == ["4.orbax-checkpoint-tmp-123"]
    with pytest.raises(CheckpointError, match="cannot restore .*do not match"):
        ck2.restore({"a": jnp.arange(4.0), "z": jnp.ones(1)})


# ------------------------------------------------------------------------------------ tiny pipeline
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    t0 = time.time()
    proc = _train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, time.time() - t0, proc


def test_tiny_pipeline_end_to_end(tiny_run):
    run_dir, seconds, proc = tiny_run
    assert seconds < 120, f"tiny pipeline took {seconds:.0f} s"
    for rel in ("config.yaml", "metrics.jsonl", "eval/dense.json", "eval/router_0.json", "eval/final.json",
                "extract/masks.npz", "export/config.json", "plots/loss.png", "plots/perplexity.png",
                "plots/load.png", "checkpoints/expert_1"):
        assert (run_dir / rel).exists(), rel
    final = json.loads((run_dir / "eval/final.json").read_text())
    assert set(final["ppl"]) == {"alpha", "beta", "gamma"}
    assert 0.0 <= final["router_accuracy"] <= 1.0 and 0.0 <= final["locality"] <= 1.0
    r0 = json.loads((run_dir / "eval/router_0.json").read_text())
    assert all(final["ppl"][d]["ppl"] < r0["ppl"][d]["ppl"] for d in final["ppl"])   # expert tuning helps
    out = proc.stdout + proc.stderr
    assert "MoE router_0" in out and "router accuracy" in out and "routing locality" in out
    assert out.count("held-out perplexity (per domain)") == 1                 # the closing table, once
    assert (run_dir / "extract/router_targets.npz").is_file()
    # rerunning the finished command skips every stage
    again = _train(run_dir)
    assert again.returncode == 0 and "[rounds] output exists, skipped" in again.stdout + again.stderr


def test_kill_then_diverge_then_rerun_matches_uninterrupted(tiny_run, tmp_path):
    ref_dir = tiny_run[0]
    run_dir = tmp_path / "run"
    killed = _train(run_dir, READMEJAX_FAIL_AT_STEP="expert_0:3")         # hard exit after update 3 (ckpt at 2)
    assert killed.returncode == 75, killed.stderr[-2000:]
    assert not (run_dir / "checkpoints" / "expert_1").exists()
    diverged = _train(run_dir, READMEJAX_NAN_AT_STEP="expert_1:3")        # update 3 of expert_1 blows up
    assert diverged.returncode == 2
    assert "TrainingDivergedError: expert_1, step 3: non-finite" in diverged.stderr
    assert "resuming at step 2/6" in diverged.stdout + diverged.stderr  # expert_0 resumed mid-round
    # the last good checkpoint (expert_1 step 2) is intact and loadable
    from readme_jax.train.checkpointing import PhaseCheckpoints
    ck = PhaseCheckpoints(run_dir / "checkpoints" / "expert_1")
    assert ck.latest_step() == 2
    flat_meta = ck.meta()
    assert flat_meta["done"] is False and flat_meta["step"] == 2
    resumed = _train(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(run_dir) == _metrics(ref_dir)
    assert json.loads((run_dir / "eval/final.json").read_text())["ppl"] == \
        json.loads((ref_dir / "eval/final.json").read_text())["ppl"]


def test_router_pool_targets_are_the_dense_targets_and_router_rounds_skip_the_dense_model(
        tiny_run, tmp_path, monkeypatch):
    from readme_jax.model.llama import Llama
    from readme_jax.train import pipeline
    from readme_jax.train.trainer import MetricsLog, Trainer, phases
    cfg = load_config("tiny")
    run = pipeline.Run(cfg, tiny_run[0], progress=False)
    pool = run.router_pool
    E, n = run.masks.num_experts, cfg.train.router_pool_seqs
    assert pool.input_ids.dtype == np.int32 and pool.input_ids.shape == (3 * n, cfg.train.seq_len)
    assert pool.dist.shape == (3 * n, run.dense.config.num_layers, cfg.train.seq_len, E)
    assert np.bincount(pool.domain).tolist() == [n] * 3                        # balanced across domains
    ref = losses.router_targets(run.dense, jnp.asarray(pool.input_ids), None, jnp.asarray(run.masks.specific),
                                use_abs=cfg.train.target_abs)
    np.testing.assert_allclose(pool.dist, np.swapaxes(np.asarray(ref), 0, 1), atol=1e-5)
    # the held-out routing targets are cached too
    assert run.heldout_routing_path.is_file()

    # a router round on the pool, with every way into the dense model broken: the backbone stays bitwise
    model, ref_model = run.fresh_model(), run.fresh_model()
    run.trainer(ref_model).load_done(phases(cfg)[0])                    # the pipeline's own router_0

    def boom(*a, **k):
        raise AssertionError("the dense model ran during a router round")
    for name in ("__call__", "hidden_states", "layer_arrays"):
        monkeypatch.setattr(Llama, name, boom)
    monkeypatch.setattr(losses, "router_targets", boom)
    monkeypatch.setattr(pipeline, "router_targets", boom)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    trainer = Trainer(cfg, tmp_path, model, pool, run.masks.specific, run.corpus, run.tokenizer,
                      MetricsLog(tmp_path / "m.jsonl"), progress=False)
    trainer.run(phases(cfg)[0])
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for k in before:
        if k != "router":
            jax.tree.map(np.testing.assert_array_equal, before[k], after[k])
    assert not np.array_equal(before["router"]["head"], after["router"]["head"])
    # same router as the pipeline's own router_0 (resumable state = pool position)
    meta = trainer.checkpoints(phases(cfg)[0]).meta()
    assert meta["data_state"] == {"pool_position": cfg.train.router_steps * cfg.train.router_batch}
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(ref_model.router, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(model.router, nnx.Param)))


def test_export_loads_back_with_same_logits(tiny_run):
    run_dir = tiny_run[0]
    from readme_jax import load_pretrained
    from readme_jax.train.pipeline import Run
    model, tok = load_pretrained(run_dir / "export", dtype=None)
    assert tok is not None and type(model).__name__ == "ReadMe"
    run = Run(load_config("tiny"), run_dir, progress=False)
    trained = run.trained_model()
    # 4 x 64 tokens: the shape the run evaluates with
    ids = jnp.asarray(np.resize(np.asarray(tok.encode("ka ro mi the zor qui shoo", bos=True)), (4, 64)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(trained(ids)))


def test_domain_with_too_few_calibration_tokens_is_a_clear_error(tmp_path):
    from readme_jax.train.pipeline import PipelineError, run_pipeline
    cfg = load_config("tiny", ["extract.calib_seqs=400"])
    for stage in ("dense", "corpus"):
        run_pipeline(cfg, tmp_path / "run", stage=stage, progress=False)
    with pytest.raises(PipelineError, match=r"domain 'alpha': .*train.jsonl holds [\d,]+ tokens = \d+ calibration "
                                            r"sequences of 64; extract.calib_seqs=400"):
        run_pipeline(cfg, tmp_path / "run", stage="stats", progress=False)


def test_rerun_with_different_training_config_is_refused(tiny_run):
    from readme_jax.train.pipeline import PipelineError, run_pipeline
    with pytest.raises(PipelineError, match=r"different \['train'\] settings"):
        run_pipeline(load_config("tiny", ["train.rounds=3"]), tiny_run[0], stage="plots", progress=False)
