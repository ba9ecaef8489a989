"""Cost model (a hand-computed step time in each prefetch mode, the committed A100 config) and workloads
(Azure CSV reading, rate scaling, truncation, expert spans)."""

import numpy as np
import pytest

from readme_jax.errors import ConfigError
from readme_jax.serve.costmodel import CostModel, HardwareSpec, ModelSpec, StepWork, check_capacity, \
    load_codesign_config
from readme_jax.serve.workload import Trace, assign_experts, gamma_arrivals, read_azure_csv, scale_to_rate, \
    synthetic_streams, truncate

TINY = ModelSpec(num_layers=2, hidden=4, expert_width=8, num_heads=2, num_kv_heads=1, head_dim=2, vocab=10,
                 bytes_per_param=2)
HW = HardwareSpec(hbm_bytes_per_s=100.0, link_bytes_per_s=10.0, peak_flops=1000.0)
WORK = StepWork(decode_tokens=3, decode_context=10, prefill_tokens=2, prefill_context=4, prefill_attended=11,
                experts=2, misses=1)


def test_hand_computed_step_time():
    # expert = 3*4*8*2 = 192 B; attention = (2+2+2)*2*4 = 48 params = 96 B; KV row = 2*1*2*2 = 8 B
    # bytes = 96 + (3+10+2+4)*8 + 2*192 = 632 -> 6.32 s; FLOPs = 2*2*(48+96) + 4*11*2*2 = 752 -> 0.752 s
    # c = 7.072 s, λ = 192 / 10 = 19.2 s, fixed (LM head 10*4*2 B) = 0.8 s
    none = CostModel(TINY, HW, "none")
    assert none.layer_compute_s(WORK) == pytest.approx(7.072)
    assert none.layer_load_s(WORK) == pytest.approx(19.2)
    assert none.step(WORK, 0.0) == pytest.approx((0.8 + 2 * (7.072 + 19.2), 2 * 19.2))
    # layer-ahead: L0 loads 0..19.2, computes 19.2..26.272; L1 loads 19.2..38.4, computes 38.4..45.472
    assert CostModel(TINY, HW, "layer-ahead").step(WORK, 0.0) == pytest.approx((46.272, 46.272 - 0.8 - 14.144))
    # step-ahead: the first step as layer-ahead; the next (at t=100) loaded by 57.6 / 76.8: no stall
    sa = CostModel(TINY, HW, "step-ahead")
    assert sa.step(WORK, 0.0)[0] == pytest.approx(46.272)
    assert sa.step(WORK, 100.0) == pytest.approx((14.944, 0.0))
    assert none.compute_and_load_s(WORK) == pytest.approx((0.8 + 2 * 7.072, 2 * 19.2))
    assert none.step(StepWork(decode_tokens=1, experts=1), 0.0) == pytest.approx((0.8 + 2 * (96 + 8 + 192) / 100, 0))


def test_committed_a100_config():
    model, hw, serving = load_codesign_config("configs/costmodel/a100_llama2_7b.yaml")
    assert model.expert_bytes == 3 * 4096 * 5504 * 2 and model.attn_bytes == 4 * 4096 * 4096 * 2
    assert check_capacity(model, hw, 5) == 4 and serving["budget"] >= 8
    with pytest.raises(ConfigError, match="k=4"):
        check_capacity(model, hw, 4)
    assert hw.scaled(link=0.5).link_bytes_per_s == hw.link_bytes_per_s / 2


def test_bad_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {num_layers: 2}\nhardware: {}\nserving: {}\n")
    with pytest.raises(ConfigError, match="missing keys"):
        load_codesign_config(p)
    with pytest.raises(ConfigError, match="prefetch"):
        CostModel(TINY, HW, "magic")


def test_azure_csv_scaling_and_truncation(tmp_path):
    p = tmp_path / "trace.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47.0000000,300,20\n"
                 "2023-11-16 18:15:46.5000000,100,0\n2023-11-16 18:15:48.5000000,5000,900\n")
    t = read_azure_csv(p)
    np.testing.assert_allclose(t.arrival, [0.0, 0.5, 2.0])
    assert t.prompt.tolist() == [100, 300, 5000] and t.rate == pytest.approx(1.0)
    s = scale_to_rate(t, 4.0)
    np.testing.assert_allclose(s.arrival, [0.0, 0.125, 0.5])
    c = truncate(t, max_requests=2, max_prompt=200, max_new=10)
    assert c.prompt.tolist() == [100, 200] and c.output.tolist() == [1, 10]
    bad = tmp_path / "bad.csv"
    bad.write_text("TIME,ContextTokens\n")
    with pytest.raises(ConfigError, match="missing columns"):
        read_azure_csv(bad)


def test_arrivals_and_expert_spans():
    a = gamma_arrivals(20000, rate=5.0, cv=2.0, seed=0)
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)
    streams = synthetic_streams(3, 50, seed=0)
    spans = assign_experts(np.array([4, 60]), np.array([3, 1]), streams, seed=0)
    assert [s.shape for s in spans] == [(6,), (60,)]
    assert all(np.isin(s, np.arange(3)).all() for s in spans)
    assert isinstance(truncate(Trace(a[:3], np.array([0, 5, 9]), np.array([2, 0, 4]))).prompt[0], np.integer)
