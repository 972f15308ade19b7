"""The README's quick start and CI agree: two commands, in a virtual environment, and CI runs the
second one word for word (so "the tests pass in CI" means the README's test command passes)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start() -> list[str]:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Quick start\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_quick_start_is_two_commands_in_a_virtual_environment() -> None:
    commands = _quick_start()
    assert len(commands) == 2, commands
    setup, tests = commands
    # A fresh Debian or Ubuntu Python refuses `pip install` outside a virtual environment.
    assert setup.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && ")
    assert setup.endswith(" .venv/bin/jobqueue demo")
    assert tests.startswith(".venv/bin/python -m pytest")


def test_ci_runs_the_readme_test_command_and_installs_at_least_its_extras() -> None:
    _, tests = _quick_start()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in [line.strip() for line in ci.splitlines()]
    assert "python3 -m venv .venv" in ci
    installed = re.search(r"pip install [^\n]*-e \"\.\[([a-z,]+)\]\"", ci)
    assert installed is not None, 'no `pip install -e ".[…]"` in .ci/run'
    assert {"test"} <= set(installed.group(1).split(","))
