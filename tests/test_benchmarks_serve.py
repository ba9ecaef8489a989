"""The serving benchmark's pure helpers and its worker protocol (no models, no timing assertions)."""

import pytest

from benchmarks import serve
from benchmarks.common import VariantError


def test_request_lengths_scale_round_and_clip():
    got = serve.request_lengths([8, 1020, 4000, 132], [1000, 129, 8, 100], 4)
    assert got == [(16, 64), (128, 16), (256, 8), (16, 12)]     # 1 -> 16 and 500 -> 256; 125 -> 64, 1 -> 8
    assert serve.request_lengths([1020, 900], [129, 40], 1) == [(128, 16)]
    with pytest.raises(ValueError, match="needs 3"):
        serve.request_lengths([10, 20], [1, 2], 3)


def test_token_identity_share_and_first_divergence():
    ours = [[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8]]
    theirs = [[1, 2, 3], [1, 9, 3], [0, 5, 6], [7, 8, 9]]
    got = serve.token_identity(ours, theirs)
    assert got["identical"] == 0.25 and got["diverging"] == 3
    assert got["mean_first_divergence"] == pytest.approx((1 + 0 + 2) / 3)
    assert serve.token_identity([[1]], [[1]]) == {"identical": 1.0, "diverging": 0, "mean_first_divergence": None}


def _step(seconds, decode, prefill=0):
    return {"seconds": seconds, "decode_tokens": decode, "prefill_tokens": prefill}


def test_engine_efficiency_uses_full_decode_steps():
    steps = [_step(0.5, 0, 100), _step(0.3, 2, 50)] + [_step(0.1, 4)] * 3 + [_step(0.12, 4), _step(0.05, 1)]
    got = serve.engine_efficiency(20.0, 4, steps)
    assert got["width"] == 4 and got["full_steps"] == 4
    assert got["t_decode_s"] == pytest.approx(0.1)
    assert got["efficiency"] == pytest.approx(20.0 / 4 * 0.1)                # 5 tok/s per slot x 0.1 s = 0.5
    # no step decodes all 8 slots: the fullest decode-only steps (4 wide) set t_d
    assert serve.engine_efficiency(20.0, 8, steps)["width"] == 4
    assert serve.engine_efficiency(1.0, 2, [_step(1.0, 0, 16)])["efficiency"] is None


def test_ms_per_output_token_counts_decode_only_steps():
    steps = [_step(1.0, 3, 16), _step(0.2, 2), _step(0.4, 4)]
    assert serve.ms_per_output_token(steps) == pytest.approx(1e3 * 0.6 / 6)
    assert serve.ms_per_output_token([_step(1.0, 1, 16)]) is None


def test_rotate():
    assert serve.rotate(("a", "b", "c"), 4) == ("b", "c", "a")


class Echo:
    """A worker handler for the protocol test (imported by the worker subprocess)."""

    def add(self, a, b):
        return {"sum": a + b}

    def fail(self):
        raise ValueError("no such thing")


def test_worker_replies_in_order_and_reports_errors():
    with serve.Worker("tests.test_benchmarks_serve:Echo", timeout=120) as w:
        assert w.call("add", a=2, b=3) == {"sum": 5}
        with pytest.raises(VariantError, match="ValueError: no such thing"):
            w.call("fail")
        assert w.call("add", a=[1], b=[2]) == {"sum": [1, 2]}          # still serving after an error
    assert w.proc.returncode == 0


@pytest.mark.slow(reason="builds and warms up a tiny Read-ME engine (compiles every bucket), then times its step")
def test_breakdown_parts_add_up_to_the_step():
    from benchmarks.serve_ours import PARTS, EngineWorker
    w = EngineWorker()
    w.load({"m": "tiny-readme"})
    w.prepare("m", 2, 16, 64)
    w.run("m", 2, [[list(range(100, 120)), 4], [list(range(200, 210)), 4]])
    free = w.engines[("m", 2)].pages.num_free
    # 25 repeats: medians of ~8 ms pieces that hold while another test process shares the 2 cores (5 were not)
    bd = w.breakdown("m", 2, context=24, experts=[1, 3], step_wall_s=0.01, repeats=25)
    ms = bd["ms"]
    runner = w.engines[("m", 2)].runner                         # 2 tokens: the first buckets, as the runner pads
    assert (bd["bucket"], bd["seq_bucket"]) == (runner.token_buckets[0], 2)
    assert (bd["context"], bd["experts"]) == (24, [1, 3])
    assert ms["router"] > 0 and ms["attention"] > 0 and ms["step"] > 0
    assert ms["other"] == pytest.approx(ms["step"] - sum(ms[k] for k in PARTS))
    assert abs(ms["other"]) <= bd["tolerance_ms"] < ms["step"]     # within the rule, and the rule is not vacuous
    assert w.engines[("m", 2)].pages.num_free == free          # its pages went back to the allocator
    w.release([])
