"""The store: engines, tables and every query. The only package that runs SQL.

`Store` opens transactions and holds the compare-and-set transitions and leases; the modules
beside it hold the named operations on what they own (`batches`, `jobs`, `requests`, `outbox`,
`results`, `lifecycle`), each run on a `Connection` in the caller's transaction. The duties, the
hooks, the service and the API call them and never build SQL themselves.
"""

from __future__ import annotations

from sqlalchemy import Connection, Row

from jobqueue.store.base import Store, StoreError
from jobqueue.store.keys import job_number_of, requests_of_batch

# The types of the store's operations: a connection in a transaction, and a row it read.
__all__ = ["Connection", "Row", "Store", "StoreError", "job_number_of", "requests_of_batch"]
