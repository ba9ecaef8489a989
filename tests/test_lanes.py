"""The test lanes are declared once and CI runs the README's test command: the markers live in pyproject.toml
(strict), CI's pytest line is the README's plus ``--durations=15``."""

import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _install_and_test(text: str) -> str:
    return next(line.strip() for line in text.splitlines() if "-m pytest" in line and "pip install" in line)


def test_ci_runs_the_readme_test_command_with_durations():
    readme = _install_and_test((REPO / "README.md").read_text())
    ci = _install_and_test((REPO / ".ci" / "run").read_text())
    assert ci == readme + " --durations=15"


def test_markers_are_declared_and_strict():
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"].split()
    assert {m.split(":")[0].split("(")[0] for m in ini["markers"]} == {"slow", "subprocess", "real_model"}


def test_a_slow_mark_without_a_reason_is_refused(request):
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if hasattr(p, "LANES_OF_FIXTURE"))

    class Item:
        nodeid, fixturenames = "t::x", ()

        def add_marker(self, m):
            pass

        def iter_markers(self, name):
            return [pytest.mark.slow.mark] if name == "slow" else []

    with pytest.raises(pytest.UsageError, match="needs reason"):
        conftest.pytest_collection_modifyitems(None, [Item()])
