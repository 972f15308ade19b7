"""Several daemons on one database: who leads, how they wake each other, and SQLite's one daemon.

PostgreSQL:

- **Leadership** is a session advisory lock (`pg_try_advisory_lock`) held on a dedicated
  connection that the leader keeps open: PostgreSQL frees it when that session ends, so a leader
  that dies, is killed or loses its connection hands over by itself. The key is derived from the
  schema, so two jobqueue installations in two schemas of one database elect a leader each.
- **Wake-ups** are `NOTIFY` on a channel named after the schema. A write transaction marks which
  duties it gave work to (`wake`, and `add_event` from each event's type); the store sends one
  notification for them just before the commit, so it reaches listeners when, and only if, the
  transaction commits. Each daemon `LISTEN`s on a dedicated connection of its own.

SQLite serves one daemon: `hold_sqlite_daemon_lock` takes an exclusive `flock` on a lock file
beside the database. The kernel drops it when the process ends, however it ends (a SIGKILLed
daemon never blocks its restart); a second daemon is refused with `DaemonAlreadyRunning`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from jobqueue.files.sharing import create_with_umask

if TYPE_CHECKING:
    from jobqueue.store.base import Store

# pg_try_advisory_lock(int4, int4): a class of our own ("jq"), and the schema's hash.
_LEADER_CLASS = 0x6A71
_LEADER_KEY = f"{_LEADER_CLASS}, hashtext(current_schema())"
# pg_advisory_xact_lock(int4, int4) taken by the claims of submit, per schema.
_CLAIMS_KEY = f"{_LEADER_CLASS + 1}, hashtext(current_schema())"
# The channel: short and a legal identifier whatever the schema's name.
_CHANNEL_SQL = "'jobqueue_' || left(md5(current_schema()), 16)"
# conn.info key of the duties a write transaction gave work to.
_WAKE_KEY = "jobqueue_wake"
# A leader's dedicated session ends on the server when it stays idle this long: a leader that
# hangs or is paused (or whose host vanished) checks in every second otherwise, so after this
# long without a word it has stopped leading and another daemon takes over.
LEADER_IDLE_TIMEOUT = 15
# TCP keepalives on both ends of a dedicated connection, so a dead peer is noticed in seconds.
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "connect_timeout": 10}  # fmt: skip
_SERVER_KEEPALIVE = (
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3"
)


class DaemonAlreadyRunning(Exception):
    """Another daemon holds the SQLite database (its message is one line for the user)."""


# Each store's engine for dedicated connections: no pool (each is opened and closed by its
# holder), and keepalives so that a vanished server or network is noticed in seconds.
_ENGINES: weakref.WeakKeyDictionary[Store, Engine] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


# -- dedicated connections (PostgreSQL) ------------------------------------------------------


def open_dedicated(store: Store, *, leader: bool = False) -> Connection:
    """A connection outside the pool, in autocommit, for LISTEN or for holding the leader lock;
    the caller keeps it open as long as it needs it and closes it. `leader`: its session ends
    on the server after `LEADER_IDLE_TIMEOUT` seconds without a statement."""
    if store.dialect != "postgresql":
        raise ValueError("dedicated connections are for PostgreSQL")
    with _ENGINES_LOCK:
        engine = _ENGINES.get(store)
        if engine is None:
            engine = create_engine(
                make_url(store.url), poolclass=NullPool, connect_args=dict(_KEEPALIVE)
            )
            _ENGINES[store] = engine
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        conn.exec_driver_sql(_SERVER_KEEPALIVE)
        if leader:
            conn.exec_driver_sql(f"SET idle_session_timeout = '{LEADER_IDLE_TIMEOUT}s'")
    except BaseException:
        conn.close()
        raise
    return conn


def dispose(store: Store) -> None:
    """Forget the store's engine of dedicated connections (`Store.close`)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.pop(store, None)
    if engine is not None:
        engine.dispose()


def close_dedicated(conn: Connection) -> None:
    """Close a dedicated connection; one already broken is closed all the same."""
    with contextlib.suppress(Exception):
        conn.invalidate()
    with contextlib.suppress(Exception):
        conn.close()


# -- leadership ------------------------------------------------------------------------------


def try_lead(conn: Connection) -> bool:
    """Take the leader lock on this (dedicated) session if no other session holds it.

    Call it only while not leading: the lock counts how often its session took it."""
    return bool(conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({_LEADER_KEY})").scalar_one())


def holds_lead(conn: Connection) -> bool:
    """Whether this session still holds the leader lock (raises if the session is gone)."""
    return bool(
        conn.exec_driver_sql(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            f"AND pid = pg_backend_pid() AND classid = {_LEADER_CLASS} "
            "AND objid = hashtext(current_schema())::oid AND objsubid = 2 AND granted)"
        ).scalar_one()
    )


def give_up_lead(conn: Connection) -> None:
    """Release the leader lock held by this session (closing the session does it too)."""
    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_LEADER_KEY})")


def leader_pid(conn: Connection) -> int | None:
    """The server process id of the session that leads, if any (for diagnostics)."""
    found = conn.exec_driver_sql(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
        f"AND classid = {_LEADER_CLASS} AND objid = hashtext(current_schema())::oid "
        "AND objsubid = 2 AND granted"
    ).first()
    return int(found[0]) if found else None


# -- wake-ups --------------------------------------------------------------------------------


def serialize_claims(conn: Connection) -> None:
    """Hold the claim lock to the end of this write transaction (PostgreSQL; on SQLite the
    write lock already orders all writers). Claims that check a budget (the enqueued tokens)
    take it first, so that two daemons' claims never both count the budget before either's
    batch is `submitting`: every claim's budget counts every batch claimed before it."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CLAIMS_KEY})")


def wake(conn: Connection, *duties: str) -> None:
    """Mark that this write transaction gives work to `duties` (`submit`, `reconcile`,
    `collect`, `webhooks`, `hooks`): on PostgreSQL every daemon hears of it once it commits."""
    if conn.dialect.name != "postgresql":
        return
    pending: set[str] = conn.info.setdefault(_WAKE_KEY, set())
    pending.update(duties)


# SQL that notifies the duties named by its parameter (comma-separated), for a statement that
# carries its own wake-up (an event's INSERT) instead of a round trip of its own.
NOTIFY_SQL = f"pg_notify({_CHANNEL_SQL}, %s)"
# conn.info key of the duties a statement of this transaction notified already.
_NOTIFIED_KEY = "jobqueue_notified"


def notified(conn: Connection, duties: Iterable[str]) -> str:
    """Note that a statement of this transaction notifies `duties` itself (with `NOTIFY_SQL`,
    PostgreSQL only); the payload it takes."""
    done: set[str] = conn.info.setdefault(_NOTIFIED_KEY, set())
    duties = sorted(duties)
    done.update(duties)
    return ",".join(duties)


def clear_wakes(conn: Connection) -> None:
    conn.info.pop(_WAKE_KEY, None)
    conn.info.pop(_NOTIFIED_KEY, None)


def send_wakes(conn: Connection) -> None:
    """Queue the notification of what this transaction marked and did not notify already;
    PostgreSQL delivers it on commit (and drops it on rollback). Called by `Store.write` just
    before it commits."""
    pending: set[str] | None = conn.info.pop(_WAKE_KEY, None)
    done: set[str] = conn.info.pop(_NOTIFIED_KEY, None) or set()
    if pending and conn.dialect.name == "postgresql" and not pending <= done:
        conn.exec_driver_sql(f"SELECT {NOTIFY_SQL}", (",".join(sorted(pending - done)),))


def listen(conn: Connection) -> str:
    """LISTEN on this (dedicated) session for the wake-ups of this schema; the channel's name."""
    channel = str(conn.exec_driver_sql(f"SELECT {_CHANNEL_SQL}").scalar_one())
    conn.exec_driver_sql(f'LISTEN "{channel}"')
    return channel


def notifications(conn: Connection, timeout: float) -> list[str]:
    """The duties named by the notifications that arrive within `timeout` seconds (at once when
    one is already waiting), each once; empty when none came. Raises if the session is gone."""
    driver: Any = conn.connection.driver_connection
    duties: list[str] = []
    for note in driver.notifies(timeout=timeout, stop_after=1):
        duties.extend(part for part in note.payload.split(",") if part)
    # What else already arrived, without waiting again.
    for note in driver.notifies(timeout=0.0):
        duties.extend(part for part in note.payload.split(",") if part)
    # Each named once: a transaction's events notify their own duties, which may repeat.
    return list(dict.fromkeys(duties))


# -- SQLite: one daemon ----------------------------------------------------------------------


class SqliteDaemonLock:
    """An exclusive `flock` on `<database>.daemon.lock`, held while the file stays open."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the file drops the lock


def sqlite_lock_path(store: Store) -> Path:
    database = make_url(store.url).database or ""
    path = Path(database).expanduser()
    return path.with_name(path.name + ".daemon.lock")


def hold_sqlite_daemon_lock(store: Store) -> SqliteDaemonLock:
    """Take the SQLite database's daemon lock, or raise `DaemonAlreadyRunning` naming the pid
    that holds it. The lock file holds the pid of its holder; it is never deleted."""
    path = sqlite_lock_path(store)
    create_with_umask(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DaemonAlreadyRunning(
            f"cannot open the daemon lock {path}: {exc.strerror or exc}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise DaemonAlreadyRunning(
            f"another jobqueue daemon{who} already runs on the SQLite database "
            f"{path.with_name(path.name.removesuffix('.daemon.lock'))}: SQLite serves one "
            "daemon; stop that one, or use PostgreSQL to run several"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return SqliteDaemonLock(path, fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def duties_of_event(type_: str) -> Iterable[str]:
    """Which duties a new event gives work to, besides delivering it (`hooks`)."""
    if type_ == "batch.queued":
        return ("hooks", "submit")
    if type_ == "batch.validating":  # a remote batch adopted: the leader refreshes it, and a
        return ("hooks", "reconcile", "webhooks")  # webhook that came early finds it now
    if type_ in ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled"):
        return ("hooks", "collect")
    return ("hooks",)
