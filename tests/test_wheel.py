"""The wheel is complete: installed on its own, it upgrades a database with the migrations it ships.

The wheel is built from a clean copy of the sources (a `build/` left in the checkout by an
earlier build could otherwise leak stale modules into it), installed into a fresh virtual
environment, and run from an unrelated directory. The new environment borrows the current one's
installed dependencies through a .pth line (no network); the directories such a line adds have
their own .pth files ignored, so the editable install of this checkout stays out of it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from jobqueue.store.migrate import head_revision

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "jobqueue", "alembic")

pytestmark = pytest.mark.slow


def _run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=240, **kwargs
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-q", "-w", dist)
    (wheel,) = dist.glob("jobqueue-*.whl")
    return wheel


def _expected_modules() -> set[str]:
    """Every module of the source tree, where the wheel must put it."""
    found = {p.relative_to(REPO).as_posix() for p in (REPO / "jobqueue").rglob("*.py")}
    migrations = REPO / "alembic"
    found |= {
        "jobqueue/migrations/" + p.relative_to(migrations).as_posix()
        for p in migrations.rglob("*.py")
    }
    return found


def _dependency_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def test_the_wheel_installs_and_upgrades_a_database_from_anywhere(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {n for n in names if n.endswith(".py")} == _expected_modules()
    assert {
        "jobqueue/py.typed",
        "jobqueue/migrations/script.py.mako",
        "jobqueue/data/prices.toml",  # the packaged Batch API prices
    } <= names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # Installed before the dependencies are visible, so pip sees no other jobqueue.
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    venv_site = Path(purelib.stdout.strip())
    (venv_site / "_host_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBQUEUE_", "PYTHON")) and k != "VIRTUAL_ENV"
    }
    env |= {
        "JOBQUEUE_DATABASE_URL": f"sqlite:///{tmp_path / 'wheel.db'}",
        "JOBQUEUE_DATA_DIR": str(tmp_path / "data"),
    }
    where = _run(
        python,
        "-c",
        "import jobqueue, jobqueue.store.migrate as m; print(jobqueue.__file__); "
        "print(m.MIGRATIONS_DIR)",
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    assert where == [
        str(venv_site / "jobqueue" / "__init__.py"),
        str(venv_site / "jobqueue" / "migrations"),
    ]

    jobqueue = venv / "bin" / "jobqueue"
    before = json.loads(_run(jobqueue, "db", "current", "--json", cwd=elsewhere, env=env).stdout)
    assert before == {"current": None, "head": head_revision()}
    _run(jobqueue, "db", "upgrade", cwd=elsewhere, env=env)
    after = json.loads(_run(jobqueue, "db", "current", "--json", cwd=elsewhere, env=env).stdout)
    assert after == {"current": head_revision(), "head": head_revision()}
    assert list(elsewhere.iterdir()) == []  # nothing written to the working directory
