"""The science experiments' building blocks: the pruned dense baseline, the layer-wise routers, the redundancy
statistics and forking a run folder (the multiple-choice scorer: test_multiple_choice.py)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.extract.masks import build_masks
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import dense_ffn
from readme_jax.model.llama import Llama
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from readme_jax.science import redundancy
from readme_jax.science.dense_baseline import kept_channels, pooled_scores, prune_ffn
from readme_jax.science.layerwise import LayerwiseMoE
from tests.tiny_models import random_model

BASE = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=4, num_heads=2, num_kv_heads=1,
                   head_dim=8, max_position_embeddings=64)
E = 3


def test_pruned_dense_baseline_has_one_experts_width():
    dense = random_model(lambda r: Llama(BASE, rngs=r), seed=1)
    rng = np.random.default_rng(0)
    scores, tokens = rng.random((E, BASE.num_layers, BASE.intermediate_size)), np.array([100, 300, 600])
    masks = build_masks(scores, 0.5, domains=["a", "b", "c"])
    channels = kept_channels(pooled_scores(scores, tokens), masks.expert_dim)
    small = prune_ffn(dense, channels)
    assert small.config.intermediate_size == masks.expert_dim == 12
    chex.assert_shape(small.ffn.w_gate[...], (BASE.num_layers, BASE.hidden_size, 12))
    chex.assert_shape(small.ffn.w_down[...], (BASE.num_layers, 12, BASE.hidden_size))
    pooled = np.einsum("e,elf->lf", tokens / tokens.sum(), scores)
    for l in range(BASE.num_layers):      # the top channels of the token-weighted pooled score, in order
        assert set(channels[l]) == set(np.argsort(-pooled[l])[:12])
    # its FFN is the dense FFN with the other channels zeroed
    h = jnp.asarray(rng.standard_normal((2, 5, BASE.hidden_size)), jnp.float32)
    full = {k: v[0] for k, v in dense.ffn.arrays().items()}
    keep = np.zeros(BASE.intermediate_size, np.float32)
    keep[channels[0]] = 1.0
    masked = dict(full, w_down=full["w_down"] * keep[:, None])
    chex.assert_trees_all_close(dense_ffn({k: v[0] for k, v in small.ffn.arrays().items()}, h)[0],
                                dense_ffn(masked, h)[0], atol=1e-5)


def test_layerwise_routes_read_each_layers_hidden_state():
    cfg = ReadMeConfig(base=BASE, num_experts=E, expert_dim=12,
                       router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=E, embed_rank=4,
                                           max_len=64))
    model = random_model(lambda r: ReadMe(cfg, rngs=r), seed=2, std=0.5)
    routers = np.random.default_rng(3).standard_normal((BASE.num_layers, BASE.hidden_size, E)).astype(np.float32)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 40, (4, 16)), jnp.int32)
    graphdef, state = nnx.split(LayerwiseMoE(model, routers))
    route = jax.jit(lambda s, x: nnx.merge(graphdef, s).route(x))        # one compile for every variant below
    base = np.asarray(route(state, ids))                                  # [L, B, T]
    chex.assert_shape(base, (BASE.num_layers, 4, 16))
    assert len(np.unique(base)) > 1
    for l in range(1, BASE.num_layers):   # layer l's attention changes the FFN input of layer l and later only
        wo = np.asarray(model.attn.wo[...]).copy()
        wo[l] = np.random.default_rng(10 + l).standard_normal(wo[l].shape) * 5
        changed = nnx.clone(model)
        changed.attn.wo[...] = jnp.asarray(wo)
        got = np.asarray(route(nnx.state(LayerwiseMoE(changed, routers)), ids))
        np.testing.assert_array_equal(got[:l], base[:l])
        assert (got[l:] != base[l:]).any(), l


def test_mutual_information_identical_and_independent():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200_000)
    same = redundancy.mutual_information(a, a, 5)
    assert same["mi"] == pytest.approx(same["h_a"], abs=1e-9)
    assert same["mi"] == pytest.approx(np.log2(5), abs=1e-3) and same["normalized"] == pytest.approx(1.0)
    indep = redundancy.mutual_information(a, rng.integers(0, 5, 200_000), 5)
    assert indep["mi"] < 1e-3 and indep["normalized"] < 1e-3
    chex.assert_trees_all_equal(redundancy.transition_counts(np.array([0, 1, 1]), np.array([1, 1, 0]), 2),
                                np.array([[0, 1], [1, 1]]))
    paths = redundancy.routing_paths(np.array([[0, 0, 1], [1, 1, 1]]))
    assert paths["distinct"] == 2 and paths["tokens"] == 3


def test_fork_reuses_what_the_variant_shares(tiny_run, tmp_path):
    from readme_jax.config import load_config
    from readme_jax.science.fork import fork_run
    from readme_jax.train.records import StageRecords
    from readme_jax.train.run import Run
    from readme_jax.train.stages import STAGES
    run_dir, _ = tiny_run
    cfg = load_config(run_dir / "config.yaml", ["train.expert_lr=1e-2"])
    child = tmp_path / "child"
    reused = fork_run(run_dir, child, cfg)
    assert {"corpus", "stats", "extract", "targets", "dense_eval"} <= set(reused["stages"])
    assert reused["phases"] == ["router_0"]            # expert_0 is the first phase the new lr changes
    assert (child / "checkpoints" / "router_0").is_dir() and not (child / "checkpoints" / "expert_0").exists()
    assert StageRecords(child).plan(STAGES, Run(cfg, child)) == set()        # nothing refused, nothing stale
    steps = [json.loads(x) for x in (child / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in steps if r.get("event") == "step"} == {"router_0"}
    # a change before the rounds reuses only what is upstream of it
    again = fork_run(run_dir, tmp_path / "child2", load_config(run_dir / "config.yaml", ["extract.keep_ratio=0.75"]))
    assert "stats" in again["stages"] and "extract" not in again["stages"] and again["phases"] == []
    # what expert phases train from and on: router_0 is reused, no expert phase
    parent_cfg = load_config(run_dir / "config.yaml")
    refit, frozen = parent_cfg.extract.refit, parent_cfg.train.freeze_embedding
    for overrides in (["train.expert_loss=kd"], [f"extract.refit={str(not refit).lower()}"], ["train.experts=fused"],
                      [f"train.freeze_embedding={str(not frozen).lower()}"]):
        r = fork_run(run_dir, tmp_path / "_".join(overrides), load_config(run_dir / "config.yaml", overrides))
        assert r["phases"] == ["router_0"], overrides


def test_science_settings_file_is_the_defaults():
    from readme_jax.science.settings import load_settings, science_settings
    from tests.tiny_run import REPO
    assert load_settings(REPO / "configs" / "science" / "default.yaml") == science_settings()
    with pytest.raises(Exception, match="unknown"):
        load_settings(None, ["mc.nope=1"])


def test_mixture_key_checked_and_records_made_before_it_still_match(tmp_path):
    from readme_jax.config import load_config
    from readme_jax.errors import ConfigError
    from readme_jax.train.records import StageRecords
    from readme_jax.train.stages import STAGES
    with pytest.raises(ConfigError, match="train.mixture"):
        load_config(None, ["train.mixture=uniform"])
    cfg = load_config()
    rounds = next(s for s in STAGES if s.name == "rounds")
    old = StageRecords(tmp_path).settings(rounds, cfg)
    old["train"] = {k: v for k, v in old["train"].items() if k != "mixture"}      # recorded before the key existed
    (tmp_path / "stages.json").write_text(json.dumps({"rounds": old}))
    assert StageRecords(tmp_path).changed(rounds, cfg) == []
    assert StageRecords(tmp_path).changed(rounds, load_config(None, ["train.mixture=balanced"])) == ["train.mixture"]
    # how checkpoints are written (or a profile taken) never makes the rounds stale: a resumed run may change it
    old["train"]["checkpoint_every"] = 4                            # a folder made when that was the default
    (tmp_path / "stages.json").write_text(json.dumps({"rounds": old}))
    ops = ["train.checkpoint_seconds=60", "train.async_checkpoint=false", "train.profile_steps=2"]
    assert StageRecords(tmp_path).changed(rounds, load_config(None, ops)) == []


def test_ablate_refit_rows_and_the_ridge_limit(tiny_run, tmp_path):
    """``ablate_refit`` on the tiny run: one row per (form, ridge) plus the unrefit one; a huge ridge pulls the
    refit back to the dense rows (so its perplexity is the unrefit one), a small one changes it."""
    import shutil
    from readme_jax.science.folder import parent_run
    from readme_jax.science.refit import AblateRefitSettings, ablate_refit
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    res = ablate_refit(parent_run(run_dir, progress=False), AblateRefitSettings(ridges=(1e-3, 1e7)), progress=False)
    rows = res["rows"]
    assert list(rows) == ["no refit", "tied, ridge 0.001", "tied, ridge 1e+07", "fused, ridge 0.001",
                          "fused, ridge 1e+07"]
    for form in ("tied", "fused"):
        for d, ppl in rows["no refit"].items():
            assert np.isfinite(rows[f"{form}, ridge 0.001"][d])
            np.testing.assert_allclose(rows[f"{form}, ridge 1e+07"][d], ppl, rtol=1e-3)
        assert rows[f"{form}, ridge 0.001"] != rows["no refit"]
    folder = run_dir / "science" / "ablate_refit"
    assert (folder / "grams.npy").is_file() and (folder / "table.md").is_file() and (folder / "ppl.png").is_file()


def test_curve_evaluates_every_kept_checkpoint(tiny_run, tmp_path):
    """The tiny run keeps every checkpoint (``train.keep_checkpoints=null``; the default keeps one) and
    ``science curve`` puts one point per kept step between router_0 and the final evaluation, on the run's wall
    clock; a ``compare`` run without its curve is refused."""
    import shutil
    import numpy as onp
    from readme_jax.errors import PipelineError
    from readme_jax.science.curve import CurveSettings, curve
    from readme_jax.science.folder import parent_run
    from readme_jax.train.checkpointing import PhaseCheckpoints
    from readme_jax.train.trainer import phases
    for keep, want in ((1, [3]), (None, [1, 2, 3])):
        ck = PhaseCheckpoints(tmp_path / f"keep{keep}", max_to_keep=keep)
        for s in (1, 2, 3):
            ck.save(s, {"w": onp.zeros(2)}, {"m": onp.zeros(2)}, {"done": s == 3})
        assert ck.steps() == want
        ck.close()
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    child = parent_run(run_dir, progress=False)
    experts = [p for p in phases(child.cfg) if p.kind == "expert"]
    every = child.cfg.train.checkpoint_every
    kept = {p.name: PhaseCheckpoints(child.phase_dir(p)).steps() for p in experts}
    assert all(k == list(range(every, p.steps + 1, every)) for p, k in zip(experts, kept.values()))
    res = curve(child, CurveSettings(), progress=False)
    pts = res["curves"]["run"]
    mids = [f"{p.name} step {s}" for p in experts for s in kept[p.name] if p != experts[-1] or s != p.steps]
    assert [p["label"] for p in pts] == ["router_0", *mids, "final"]
    secs = [p["seconds"] for p in pts]
    assert all(a < b for a, b in zip(secs, secs[1:])) and secs[0] > 0
    final = json.loads(child.eval_path("final").read_text())["ppl"]
    assert pts[-1]["ppl"] == {d: v["ppl"] for d, v in final.items()}
    mid = [tuple(p["ppl"].values()) for p in pts[1:-1]]
    assert len(set(mid)) == len(mid) and all(np.isfinite(m).all() for m in mid)
    assert pts[1]["ppl"] != pts[0]["ppl"]
    assert (child.dir / "science" / "curve" / "ppl_vs_time.png").stat().st_size > 0
    with pytest.raises(PipelineError, match="run python -m readme_jax.science curve"):
        curve(child, CurveSettings(compare=(str(tmp_path / "none"),)), progress=False)


def test_dense_baseline_refit_and_equal_wall_time(tiny_run, tmp_path):
    """The equal-size dense baseline on the tiny run: its down-projections refit as the parent's experts were,
    its steps scaled by the measured step-time ratio (kept as a part, so a rerun reuses it), evaluated; a parent
    tuned with distillation is refused."""
    import shutil
    from readme_jax.errors import PipelineError
    from readme_jax.science.dense_baseline import DenseBaselineSettings, dense_baseline
    from readme_jax.science.folder import parent_run
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    parent = parent_run(run_dir, progress=False)
    res = dense_baseline(parent, DenseBaselineSettings(), progress=False)
    t = parent.cfg.train
    timing = json.loads((run_dir / "science" / "dense_baseline" / "parts" / "wall_time.json").read_text())
    assert timing["readme_step_seconds"] > 0 and timing["baseline_step_seconds"] > 0
    ratio = timing["readme_step_seconds"] / timing["baseline_step_seconds"]
    assert res["steps"] == t.rounds * max(1, round(t.expert_steps * ratio))
    assert res["refit"] == parent.cfg.extract.refit and res["wall_time"] == timing
    losses = json.loads((run_dir / "science" / "dense_baseline" / "parts" / "losses.json").read_text())
    assert len(losses) == res["steps"]
    for d, v in res["ppl"]["equal-size dense (tuned)"].items():
        assert np.isfinite(v["ppl"])
    again = dense_baseline(parent, DenseBaselineSettings(), progress=False)      # resumed from its parts
    assert again["ppl"] == res["ppl"] and again["steps"] == res["steps"]
    from readme_jax.config import load_config
    from readme_jax.train.run import Run
    kd = Run(load_config(run_dir / "config.yaml", ["train.expert_loss=kd"]), run_dir, progress=False)
    with pytest.raises(PipelineError, match="expert_loss=kd"):
        dense_baseline(kd, DenseBaselineSettings(), progress=False)


@pytest.mark.slow(reason="compiles the tiny baseline's tuning step twice")
@pytest.mark.parametrize("freeze", [False, True])
def test_dense_baseline_tunes_what_the_parents_expert_step_tunes(tiny_run, freeze):
    """``tune_lm`` follows ``train.freeze_embedding`` as Read-ME's expert step does: a frozen tied embedding (the
    head) is left exactly as it was, every other weight moves; unfrozen, the embedding moves too."""
    import dataclasses
    from readme_jax.config import load_config
    from readme_jax.science.dense_baseline import tune_lm
    from readme_jax.train.run import Run
    from readme_jax.train.trainer import phases
    run_dir = tiny_run[0]
    run = Run(load_config(run_dir / "config.yaml", [f"train.freeze_embedding={str(freeze).lower()}"]), run_dir,
              progress=False)
    model = run.dense
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    schedule = [dataclasses.replace(p, steps=2) for p in phases(run.cfg) if p.kind == "expert"][:1]
    logged = []
    tune_lm(model, run, schedule, log=logged.append, progress=False)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(logged) == 2 and all(np.isfinite(r["loss"]) for r in logged)
    moved = {"/".join(map(str, k)): not np.array_equal(before[k], after[k]) for k in before}
    embed = [k for k in moved if "embed" in k]
    assert embed and all(moved[k] != freeze for k in embed), moved
    assert all(moved[k] for k in moved if "embed" not in k), moved
