"""Registries own names and options: every registered scheduler, cache policy, dispatcher and science
experiment meets its contract; one added by one class + one decorator (tests/registry_extensions.py) is in the
CLI's choices and in every parametrised test; bad names and options are one ConfigError."""

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import yaml

from readme_jax.errors import ConfigError
from readme_jax.model.dispatch import DISPATCHERS
from readme_jax.registry import Registry
from readme_jax.science import EXPERIMENTS
from readme_jax.serve import __main__ as serve_cli
from readme_jax.serve.api import RunningDecode, WaitingPrefill
from readme_jax.serve.expert_cache import POLICIES, offline_optimum, replay
from readme_jax.serve.schedulers import SCHEDULERS

REPO = Path(__file__).resolve().parent.parent
ADDED = {"scheduler": "newest-first", "cache policy": "mru", "dispatcher": "onehot"}


def test_an_entry_added_by_one_class_and_one_decorator_is_everywhere():
    assert ADDED["scheduler"] in SCHEDULERS.names() and ADDED["cache policy"] in POLICIES.names()
    assert ADDED["dispatcher"] in DISPATCHERS.names()
    args = serve_cli.parse_args(["--model", "m", "--scheduler", "newest-first", "--expert-policy", "mru",
                                 "--dispatcher", "onehot"])
    assert (args.scheduler, args.expert_policy, args.dispatcher) == ("newest-first", "mru", "onehot")
    text = _help()
    for name in ADDED.values():
        assert name in text
    # the parametrised tests below (and test_moe's, test_schedulers', test_expert_cache's) take these lists
    for name, params in ((ADDED["scheduler"], SCHEDULER_PARAMS), (ADDED["cache policy"], POLICY_PARAMS),
                         (ADDED["dispatcher"], DISPATCHER_PARAMS)):
        assert name in params


def _help() -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        serve_cli.parse_args(["--help"])
    return out.getvalue()


SCHEDULER_PARAMS = SCHEDULERS.names()
POLICY_PARAMS = POLICIES.names()
DISPATCHER_PARAMS = DISPATCHERS.names()


@pytest.mark.parametrize("name", SCHEDULER_PARAMS)
def test_every_scheduler_keeps_the_budget_slots_and_chunks(name):
    """Random queues: picks only running slots (each once), at most ``budget`` tokens, no more new prompts
    than ``free_slots``, chunks within what remains; a lone decode or prompt is always served."""
    rng = np.random.default_rng(0)
    sched = SCHEDULERS.make(name)
    for _ in range(200):
        running = [RunningDecode(slot=int(s), request_id=f"d{s}", arrival=int(rng.integers(0, 9)),
                                 expert=int(rng.integers(-1, 4)), waited=int(rng.integers(0, 12)))
                   for s in rng.permutation(16)[:rng.integers(0, 12)]]
        waiting = [WaitingPrefill(f"r{i}", int(rng.integers(0, 9)), np.full(int(rng.integers(1, 20)), -1, np.int32),
                                  slot=(None if rng.random() < 0.6 else 100 + i)) for i in range(rng.integers(0, 5))]
        budget, free = int(rng.integers(1, 12)), int(rng.integers(0, 4))
        p = sched.pick(waiting, running, budget, free)
        assert p.num_tokens <= budget
        assert len(set(p.decodes)) == len(p.decodes) and set(p.decodes) <= {r.slot for r in running}
        by_id = {w.request_id: w for w in waiting}
        assert sum(by_id[r].slot is None for r, _ in p.prefills) <= free
        assert all(0 < n <= by_id[r].remaining for r, n in p.prefills)
    assert sched.pick([], [RunningDecode(slot=0, request_id="d", arrival=0, expert=1)], 1, 0).decodes == (0,)


@pytest.mark.parametrize("name", POLICY_PARAMS)
def test_every_cache_policy_is_bounded_by_the_optimum(name):
    rng = np.random.default_rng(1)
    policy = POLICIES.make(name)
    assert isinstance(policy.uses_future, bool)
    for _ in range(20):
        trace = [set(rng.choice(6, size=int(rng.integers(1, 3)), replace=False).tolist()) for _ in range(30)]
        stats = replay(trace, POLICIES.make(name), 2)
        assert stats.hits + stats.misses == sum(len(s) for s in trace)
        assert stats.misses >= offline_optimum(trace, 2)


@pytest.mark.parametrize("name", DISPATCHER_PARAMS)
def test_every_dispatcher_is_built_from_its_options_and_hashable(name):
    d = DISPATCHERS.make(name)
    assert d.name == name and hash(d) == hash(DISPATCHERS.make(name)) and d == DISPATCHERS.make(name)
    assert dataclasses.is_dataclass(d)


@pytest.mark.parametrize("name", EXPERIMENTS.names())
def test_every_science_experiment_has_its_section_and_signature(name):
    section = yaml.safe_load((REPO / "configs" / "science" / "default.yaml").read_text())[name]
    assert section == _plain(EXPERIMENTS.options(name))
    params = inspect.signature(EXPERIMENTS.entry(name).cls).parameters
    assert list(params)[:2] == ["parent", "settings"] and params["progress"].kind == inspect.Parameter.KEYWORD_ONLY


def _plain(x):
    from readme_jax.config.loader import plain
    return plain(x)


def test_science_cli_choices_are_the_registry():
    from readme_jax.science.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["no_such_experiment"])
    assert e.value.code == 2
    assert set(EXPERIMENTS.names()) == set(yaml.safe_load(
        (REPO / "configs" / "science" / "default.yaml").read_text()))


def test_registry_errors_and_options():
    r = Registry("widget")

    @dataclasses.dataclass(frozen=True)
    class SizeOptions:
        size: int = 2

        def __post_init__(self):
            if self.size < 1:
                raise ConfigError(f"widget: size must be >= 1, got {self.size}")

    @r.register("sized", SizeOptions)
    class Sized:
        """A widget of a size."""

        def __init__(self, options):
            self.size = options.size

    with pytest.raises(ConfigError, match="registered twice"):
        r.register("sized")(type("Other", (), {}))
    with pytest.raises(ConfigError, match=r"widget 'nope' is unknown; known: \['sized'\]"):
        r.make("nope")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]; it takes \['size'\]"):
        r.make("sized", colour=1)
    with pytest.raises(ConfigError, match="size must be >= 1"):
        r.make("sized", size=0)
    assert r.make("sized", size=3).size == 3 and r.make_from("sized", {"size": 4, "max_wait": 1}).size == 4
    assert r.help() == "sized (size): A widget of a size"


def test_serve_cli_refuses_an_option_of_another_entry_in_one_line(capsys):
    assert serve_cli.main(["--model", "m", "--scheduler", "decode-first", "--max-wait", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: scheduler 'decode-first': unknown option(s) ['max_wait']; it takes none"]
    assert serve_cli.main(["--model", "m", "--dispatcher", "ragged", "--dispatcher-block-size", "8"]) == 2
    assert "dispatcher 'ragged': unknown option(s) ['block_size']" in capsys.readouterr().err


def test_a_config_key_selects_the_dispatcher():
    """train.dispatcher and the serve CLI's --dispatcher select a registered dispatcher over the default."""
    from readme_jax.config import load_config
    from readme_jax.model import dispatch
    assert load_config("tiny", ["train.dispatcher=ragged"]).train.dispatcher == "ragged"
    with pytest.raises(ConfigError, match="train.dispatcher"):
        load_config("tiny", ["train.dispatcher=nope"])
    assert dispatch.default_dispatcher(4, "onehot") == DISPATCHERS.make("onehot")
    assert dispatch.default_dispatcher(4) == dispatch.get("grouped")
    assert dispatch.default_dispatcher(4, "blocked") == dispatch.get("blocked")
