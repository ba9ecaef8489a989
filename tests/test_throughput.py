"""An expert update's model TFLOP/s and MFU in the metrics (PaLM's FLOPs accounting over a measured peak)."""

import json
import math

import pytest

from readme_jax.train.throughput import WALL_CLOCK_KEYS, Throughput, flops_per_token, matmul_peak


def test_flops_per_token_is_palms_six_n_plus_attention():
    # SmolLM2-shaped Read-ME: 98.5M active parameters, 30 layers x 9 heads x 64 dims, 512-token sequences
    got = flops_per_token(98_500_000, layers=30, heads=9, head_dim=64, seq_len=512)
    assert got == 6 * 98_500_000 + 12 * 30 * 9 * 64 * 512


def test_step_metrics_from_tokens_and_seconds():
    tp = Throughput(flops_per_token=1e6, peak=2e12)
    m = tp.of_step(tokens=2048, seconds=2.0)
    assert m == {"tflops": pytest.approx(1.024e-3), "mfu": pytest.approx(0.512e-3)}
    assert set(m) < set(WALL_CLOCK_KEYS)


def test_matmul_peak_is_a_positive_rate():
    peak = matmul_peak("float32", 64)
    assert math.isfinite(peak) and peak > 1e6           # any machine does more than a MFLOP/s


def test_of_a_read_me_counts_its_active_params(tiny_readme):
    a = tiny_readme.arch
    tp = Throughput.of(tiny_readme, seq_len=32, dtype="float32", devices=8)
    assert tp.flops_per_token == 6 * tiny_readme.active_params() + 12 * a.num_layers * a.num_heads * a.head_dim * 32
    assert tp.peak == matmul_peak("float32")             # simulated CPU devices share the same cores


def test_expert_steps_of_the_tiny_run_record_tflops_and_mfu(tiny_run):
    run_dir, _ = tiny_run
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("event") == "step"]
    experts = [r for r in steps if r["kind"] == "expert"]
    assert experts and all(r["tokens_per_s"] > 0 for r in steps)
    for r in experts:
        assert r["tflops"] > 0 and 0 < r["mfu"]
        s, rate = r["seconds"], r["tokens_per_s"]           # rounded to 1 ms and to 0.01 tokens/s
        assert r["tokens"] / (s + 5e-4) - 5e-3 <= rate <= r["tokens"] / max(s - 5e-4, 1e-9) + 5e-3
    assert not any("mfu" in r for r in steps if r["kind"] == "router")
