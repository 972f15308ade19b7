"""The store: engines, tables and every query. The only package that runs SQL.

`Store` is the one door: the duties, the hooks, the service and the API call its named
operations and never build SQL themselves.
"""

from __future__ import annotations

from jobqueue.store.base import Store, StoreError, job_number_of, requests_of_batch

__all__ = ["Store", "StoreError", "job_number_of", "requests_of_batch"]
