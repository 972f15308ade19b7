"""The package's layers hold: the import-linter contracts, and what an import really loads.

The contracts live in pyproject.toml (`[tool.importlinter]`); each one is checked here on its own
by `lint-imports`, so the README's test command checks them all.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import jobqueue

REPO = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {contract["id"]: contract for contract in CONFIG["contracts"]}

# Top-level modules that sit outside the layers on purpose.
OUTSIDE_LAYERS = {
    "__main__",  # `python -m jobqueue`: the CLI
    "emulator",  # its own contract: nothing of jobqueue but httpserver, version and tokens
    "testing",  # an in-memory remote for tests: may import the remote
}


def _lint_imports() -> str:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    return found or shutil.which("lint-imports") or pytest.fail("lint-imports is not installed")


@pytest.mark.parametrize("contract_id", list(CONTRACTS))
def test_import_contract(contract_id: str) -> None:
    result = subprocess.run(
        [_lint_imports(), "--no-cache", "--contract", contract_id],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{CONTRACTS[contract_id]['name']}:\n{result.stdout}"


def test_every_top_level_module_is_in_a_layer() -> None:
    """A new module or subpackage of jobqueue cannot escape the layers contract unnoticed."""
    layered: set[str] = set()
    for layer in CONTRACTS["layers"]["layers"]:
        for name in layer.replace(":", "|").split("|"):
            layered.add(name.strip().strip("()").removeprefix("jobqueue."))
    present = {m.name for m in pkgutil.iter_modules(jobqueue.__path__)}
    assert present - OUTSIDE_LAYERS <= layered, present - OUTSIDE_LAYERS - layered
    assert layered <= present, layered - present


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(result.stdout))


def _under(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


def test_the_state_machine_loads_no_io_library() -> None:
    loaded = _loaded_after("import jobqueue.core.states")
    assert "transitions" in loaded  # the probe sees third-party modules
    assert not _under(loaded, "httpx", "sqlalchemy", "sqlmodel", "alembic", "starlette")
    ours = _under(loaded, "jobqueue")
    assert ours <= {"jobqueue", "jobqueue.version"} | _under(ours, "jobqueue.core"), ours


def test_the_emulator_loads_nothing_of_the_store_or_the_api() -> None:
    loaded = _loaded_after("import jobqueue.emulator")
    assert "jobqueue.emulator.engine" in loaded
    assert not _under(loaded, "jobqueue.store", "jobqueue.api", "sqlalchemy")
    ours = _under(loaded, "jobqueue")
    allowed = {"jobqueue", "jobqueue.version", "jobqueue.httpserver", "jobqueue.tokens"}
    assert ours - _under(ours, "jobqueue.emulator") <= allowed, ours


# What no CLI start-up needs: the API and what it brings (the store, SQLAlchemy, the settings,
# the remote client), and the emulator; each command imports them when it runs (issue 14).
NOT_AT_START_UP = (
    "jobqueue.api",
    "jobqueue.store",
    "jobqueue.settings",
    "jobqueue.remote",
    "jobqueue.service",
    "jobqueue.emulator",
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "httpx",
    "uvicorn",
    "starlette",
)
COMPLETE_COMMANDS = {
    "_JOBQUEUE_COMPLETE": "complete_bash",
    "COMP_WORDS": "jobqueue ",
    "COMP_CWORD": "1",
}


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, set[str]]:
    """Run `jobqueue ARGS` in a fresh interpreter: its exit code, its stdout, and the modules it
    loaded."""
    code = (
        "import json, sys\n"
        "from jobqueue.cli import main\n"
        f"code = main({args!r})\n"
        "print('\\nLOADED', json.dumps(sorted(sys.modules)))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    out, _, loaded = result.stdout.rpartition("\nLOADED ")
    assert loaded, result.stderr
    return result.returncode, out, set(json.loads(loaded))


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        pytest.param(["--help"], None, "emulator  Serve a local", id="--help"),
        pytest.param(["status", "--help"], None, "Usage: jobqueue status", id="status --help"),
        pytest.param(["submit", "--help"], None, "Usage: jobqueue submit", id="submit --help"),
        pytest.param(["run", "--help"], None, "Usage: jobqueue run", id="run --help"),
        pytest.param(["demo", "--help"], None, "Usage: jobqueue demo", id="demo --help"),
        pytest.param(
            ["db", "current", "--help"], None, "jobqueue db current", id="db current --help"
        ),
        pytest.param(["--version"], None, f"jobqueue {jobqueue.__version__}", id="--version"),
        pytest.param([], COMPLETE_COMMANDS, "emulator", id="completion"),
    ],
)
def test_the_cli_starts_without_the_api_the_store_or_the_emulator(
    args: list[str], env: dict[str, str] | None, shown: str
) -> None:
    code, out, loaded = _run_cli(args, env)
    assert code == 0 and shown in out, out
    assert "typer" in loaded  # the probe sees third-party modules
    assert not _under(loaded, *NOT_AT_START_UP), sorted(_under(loaded, *NOT_AT_START_UP))


def test_the_emulator_command_loads_when_it_is_asked_for() -> None:
    """Its options are the emulator's: its help and the completion of its options load it."""
    code, out, loaded = _run_cli(["emulator", "--help"], {"COLUMNS": "200"})
    assert code == 0 and "Usage: jobqueue emulator [OPTIONS]" in out and "--time-scale" in out
    assert "jobqueue.emulator.command" in loaded and "jobqueue.api" not in loaded
    completion = {**COMPLETE_COMMANDS, "COMP_WORDS": "jobqueue emulator --time", "COMP_CWORD": "2"}
    code, out, _ = _run_cli([], completion)
    assert code == 0 and out.split() == ["--time-scale"], out


def test_a_command_on_sqlite_loads_no_postgresql_driver_nor_the_remote(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'jobqueue.db'}"
    code, out, loaded = _run_cli(
        ["--database-url", database, "--data-dir", str(tmp_path / "data"), "status"]
    )
    assert code == 0 and "no jobs" in out, out
    assert "jobqueue.store" in loaded
    unneeded = _under(loaded, "psycopg", "psycopg2", "asyncpg", "jobqueue.remote", "httpx")
    assert not unneeded, sorted(unneeded)


def test_migrations_env_imports_only_the_tables_of_jobqueue() -> None:
    """alembic/env.py runs inside `Store` (on upgrade): it must not import the store's engine."""
    tree = ast.parse((REPO / "alembic" / "env.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "jobqueue.store.tables" in imported
    assert _under(imported, "jobqueue") == {"jobqueue.store.tables"}, imported


def test_the_tables_load_without_the_engine_or_the_migration_runner() -> None:
    """What alembic/env.py imports for the metadata brings neither `Store` nor the runner."""
    loaded = _loaded_after("import jobqueue.store.tables")
    assert "jobqueue.store.tables" in loaded
    assert not {"jobqueue.store.base", "jobqueue.store.migrate"} & loaded, loaded
