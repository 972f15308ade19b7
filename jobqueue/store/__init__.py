"""The store: engines, tables and every query. The only package that runs SQL.

`Store` opens transactions and holds the compare-and-set transitions and leases; the modules
beside it hold the named operations on what they own (`batches`, `jobs`, `requests`, `outbox`,
`results`, `lifecycle`), each run on a `Connection` in the caller's transaction. The duties, the
hooks, the service and the API call them and never build SQL themselves.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection, Row
    from sqlalchemy.exc import DBAPIError as DatabaseError

    from jobqueue.store.base import Store, StoreError
    from jobqueue.store.batches import BatchChange
    from jobqueue.store.keys import job_number_of, requests_of_batch

# Loaded on first use, so that `jobqueue.store.tables` (which the migrations' env imports for
# the metadata) does not bring the engine and the migration runner with it. `Connection` and
# `Row` are the types of the store's operations: a connection in a transaction, a row it read.
_EXPORTS = {
    "BatchChange": "jobqueue.store.batches",
    "Connection": "sqlalchemy",
    "Row": "sqlalchemy",
    # What the database driver raised (e.g. "database or disk is full"), as SQLAlchemy wraps it.
    "DatabaseError": "sqlalchemy.exc:DBAPIError",
    "Store": "jobqueue.store.base",
    "StoreError": "jobqueue.store.base",
    "job_number_of": "jobqueue.store.keys",
    "requests_of_batch": "jobqueue.store.keys",
}

__all__ = [
    "BatchChange",
    "Connection",
    "DatabaseError",
    "Row",
    "Store",
    "StoreError",
    "job_number_of",
    "requests_of_batch",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jobqueue.store' has no attribute {name!r}")
    module, _, attribute = module.partition(":")
    value = getattr(import_module(module), attribute or name)
    globals()[name] = value
    return value
