"""The driver's own connection under a SQLAlchemy one (sqlite3 or psycopg), for the hot paths
whose statements are plain SQL text: there SQLAlchemy's execution and result handling cost
more than the statement itself."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection


def driver_of(conn: Connection) -> Any:
    """The driver's connection of `conn`, in `conn`'s transaction."""
    driver = conn.connection.driver_connection
    assert driver is not None  # a connection in use always has one
    return driver


def driver_cursor(conn: Connection) -> Any:
    """A cursor of the driver's own connection under `conn`."""
    return driver_of(conn).cursor()
