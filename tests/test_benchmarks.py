"""The benchmark runner's plumbing on fake modules, the timing helper's bookkeeping, and every registered
benchmark module (no timing assertions)."""

import importlib
import json
import types

import pytest

from benchmarks import common, runner


def _fake_module(rows):
    mod = types.ModuleType("fake_bench")
    mod.calls = []

    def run(quick=False):
        mod.calls.append(quick)
        return rows

    mod.run = run
    return mod


def _crashing_module():
    mod = types.ModuleType("crash_bench")

    def run(quick=False):
        raise RuntimeError("boom")

    mod.run = run
    return mod


def test_runner_table_json_png_and_error_rows(tmp_path, capsys):
    good = _fake_module([
        common.make_row("fake", "speed", 200.0, 100.0, "tok/s", higher_is_better=True, goal=1.5, note="n"),
        common.make_row("fake", "latency", 20.0, 10.0, "ms", higher_is_better=False, goal=1.0),
        {"benchmark": "fake", "case": "partial", "ours": 1.0, "baseline": None, "unit": "MiB",
         "ratio": float("nan"), "goal": None, "note": None},
    ])
    modules = {"good_mod": good, "crash_mod": _crashing_module()}

    def importer(name):
        if name in modules:
            return modules[name]
        raise ImportError(f"No module named {name!r}")

    registry = {"good": "good_mod", "missing": "no_such_benchmark_module", "crash": "crash_mod"}
    rc = runner.main(["--quick", "--out", str(tmp_path)], registry=registry, importer=importer)
    assert rc == 0
    assert good.calls == [True]

    payload = json.loads((tmp_path / "benchmarks.json").read_text())
    assert payload["meta"]["quick"] is True
    rows = payload["rows"]
    assert [r["benchmark"] for r in rows] == ["fake", "fake", "fake", "missing", "crash"]
    for r in rows:
        assert set(r) == set(common.ROW_KEYS)
    speed, latency, partial, missing, crash = rows
    assert speed["ratio"] == pytest.approx(2.0)      # higher-is-better: ours / baseline
    assert latency["ratio"] == pytest.approx(0.5)    # times: baseline / ours
    assert partial["ratio"] is None                  # NaN is normalised to null in the JSON
    assert missing["note"].startswith("ERROR") and "no_such_benchmark_module" in missing["note"]
    assert crash["note"].startswith("ERROR") and "boom" in crash["note"]
    assert [runner.status(runner._normalise(r, "x")) for r in rows] == ["ok", "MISS", "", "ERROR", "ERROR"]

    assert (tmp_path / "benchmarks.png").stat().st_size > 0
    out = capsys.readouterr().out
    for text in ("speed", "latency", "missing", "crash", "2.00x"):
        assert text in out


def test_plain_table_lists_every_row():
    rows = [runner._normalise(common.make_row("b", f"case{i}", i + 1.0, 2.0, "u", higher_is_better=True), "b")
            for i in range(3)]
    text = runner.format_table(rows)
    assert all(f"case{i}" in text for i in range(3))
    assert len(text.splitlines()) == 2 + 3


def test_unknown_name_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        runner.main(["nope", "--out", str(tmp_path)], registry={"good": "x"})


def test_run_variant_uses_a_fresh_process_with_thread_settings():
    res = common.run_variant("benchmarks.common:echo", {"a": 1}, timeout=120)
    assert res["args"] == {"a": 1}
    assert "--xla_cpu_multi_thread_eigen=true" in res["xla_flags"]
    assert "xla_force_host_platform_device_count" not in res["xla_flags"]
    assert res["omp"] == str(common.NUM_THREADS)
    assert res["jax_imported"] is False
    assert res["peak_rss_mb"] > 0


def test_run_variant_failure_raises_with_stderr():
    with pytest.raises(common.VariantError, match="no_such_function|AttributeError"):
        common.run_variant("benchmarks.common:no_such_function", {}, timeout=120)


@pytest.mark.parametrize("name", sorted(runner.REGISTRY))
def test_every_registered_benchmark_imports_and_has_run(name):
    mod = importlib.import_module(runner.REGISTRY[name])
    assert callable(mod.run)


def test_time_calls_round_robin_with_setup_and_per_call_units():
    order = []
    calls = {"a": lambda: order.append("a"),
             "b": common.Timed(lambda x: order.append(x), setup=lambda: (order.append("setup") or "b",), per_call=4)}
    out = common.time_calls(calls, warmup=1, repeats=3)
    assert order == ["a", "setup", "b"] * 4            # warm-up round + 3 timed rounds, interleaved
    assert set(out) == {"a", "b"} and all(len(v["wall"]) == len(v["cpu"]) == 3 for v in out.values())
    assert all(t >= 0 for v in out.values() for t in v["wall"] + v["cpu"])


def test_ep_routings_bytes_rows_and_plot(tmp_path):
    """benchmarks/ep.py's host side on a hand-made result (the variant itself needs minutes)."""
    import numpy as np

    from benchmarks import ep
    for kind in ep.ROUTINGS:
        ids = ep.routing_ids(kind, 64, 8)
        assert ids.shape == (64,) and ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 8
    assert np.bincount(ep.routing_ids("balanced", 64, 8)).tolist() == [8] * 8
    assert (ep.routing_ids("one_expert", 64, 8) == 0).all()
    # 2 devices on an expert axis of 2, n = 4, C = 2, D = 1 (4-byte rows): device 1 keeps counts[1, 1]
    counts = np.array([[3, 1], [2, 2]])
    assert ep.bytes_moved(counts, 2, 1) == {"all_to_all": 2 * (2 * 2 * 4 + 2 * 4),
                                            "all_gather": 2 * (2 * 4 * 4 + 2 * 4 * 4),
                                            "minimum": 3 * (2 * 4 + 4)}
    times = {f"{s} {c}": {"wall": [0.01], "cpu": [0.02]} for s in ("all_to_all", "all_gather")
             for c in ("fwd", "fwd_bwd")}
    res = {"buckets": [8, 16], "routings": {"balanced": {"counts": [[8] * 8] * 8, "capacity": 8,
                                                         "capacity_factor": 10, "dropped": 0, "dropped_factor": 0,
                                                         "times": times},
                                            "one_expert": {"counts": [[64] + [0] * 7] * 8, "capacity": 64,
                                                           "capacity_factor": 10, "dropped": 0,
                                                           "dropped_factor": 432}}}
    rows, per_token = ep.rows_of(res, 512)
    by_case = {r["case"].split(" N=")[0]: r for r in rows}
    assert set(by_case) == {"bytes balanced", "time fwd balanced", "time fwd_bwd balanced", "padding balanced",
                            "kept balanced", "bytes one_expert", "padding one_expert", "kept one_expert"}
    assert by_case["kept one_expert"]["ratio"] == 512 / 80 and by_case["kept balanced"]["ratio"] == 1.0
    assert by_case["padding balanced"]["ours"] == 0 and by_case["bytes balanced"]["ratio"] > 1
    assert set(per_token) == {"balanced", "one_expert"}
    png = ep.plot_bytes(per_token, tmp_path / "ep.png")
    assert png is None or png.stat().st_size > 0


def test_serve_revs_worktree_and_rows(tmp_path):
    """common.code_root (serve_revs, train_step): a revision's code comes from a worktree (removed after), '.'
    is this checkout; serve_revs.rows_of: medians, ratios > 1 when the new revision is faster."""
    from benchmarks import serve_revs
    with common.code_root("HEAD", tmp_path) as root:
        assert (root / "readme_jax" / "serve" / "__main__.py").is_file() and root != common.REPO_ROOT
    assert not root.exists()
    with common.code_root(".", tmp_path) as root:
        assert root == common.REPO_ROOT
    run = lambda tok_s, tpot: {"tok_s": tok_s, "tpot_ms": tpot, "ttft_ms": 100.0}
    result = {"revs": {"base": "abc1234", "new": "."}, "settings": {"concurrencies": [8, 32], "num_prompts": 4,
                                                                   "input_len": 128, "output_len": 64},
              "runs": {"new@C=8": [run(90, 50), run(110, 40)], "base@C=8": [run(100, 50), run(100, 50)]}}
    rows = serve_revs.rows_of(result)
    assert [r["case"] for r in rows] == ["output tok/s, . vs abc1234, C=8", "TPOT p50, . vs abc1234, C=8",
                                         "TTFT p50, . vs abc1234, C=8"]
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[1]["ratio"] == pytest.approx(50 / 45)
