"""The package's layers hold: the import-linter contracts, and what an import really loads.

The contracts live in pyproject.toml (`[tool.importlinter]`); each one is checked here on its own
by `lint-imports`, so the README's test command checks them all.
"""

from __future__ import annotations

import ast
import json
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
