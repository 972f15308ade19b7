"""Running the migrations: an installed jobqueue upgrades its own database.

The migrations live in `alembic/` at the top of the repository (`alembic.ini` points there, for
`alembic revision` and `alembic check`); the wheel ships them as `jobqueue/migrations/`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobqueue.store import Store


def _migrations_dir() -> Path:
    """`jobqueue/migrations/` in an installed wheel, `alembic/` in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"jobqueue's migrations are missing (looked beside {package})")


MIGRATIONS_DIR = _migrations_dir()
# Any constant will do: it only has to be the same for every jobqueue process.
_PG_LOCK_KEY = 0x6A6F6271


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(store: Store, revision: str = "head") -> None:
    """Upgrade under a lock, so two processes opening one old database migrate it once."""
    _run(store, lambda config: command.upgrade(config, revision))


def downgrade(store: Store, revision: str) -> None:
    _run(store, lambda config: command.downgrade(config, revision))


def _run(store: Store, step: Callable[[Config], None]) -> None:
    config = alembic_config(store.url)
    with migration_connection(store) as conn:
        config.attributes["connection"] = conn
        step(config)


@contextmanager
def migration_connection(store: Store) -> Iterator[Connection]:
    """A write transaction fit for migrations, under a lock every jobqueue process respects.

    SQLite rebuilds a table to alter it (copy, drop, rename): with foreign keys enforced,
    dropping a referenced table fails. They are switched off for this connection only (the
    pragma is a no-op inside a transaction, hence before BEGIN) and checked before commit.
    """
    if store.dialect != "sqlite":
        with store.write() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            yield conn
        return
    with store.writer_connection() as conn:
        sqlite = conn.connection.driver_connection
        assert sqlite is not None  # a checked-out connection has its DB-API connection
        sqlite.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left broken foreign keys: {broken[:5]}")
        finally:
            # The connection goes back to the store's pool: enforcing again, or not reused.
            try:
                sqlite.execute("PRAGMA foreign_keys = ON")
            except Exception:
                conn.invalidate()


def upgrade_if_behind(store: Store) -> bool:
    """Upgrade when the database is behind the code; a cheap check when it is not."""
    if current_revision(store) == head_revision():
        return False
    upgrade(store)
    return True
