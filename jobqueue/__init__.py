"""jobqueue: a durable job queue for OpenAI-style Batch APIs.

The public names are loaded on first use (PEP 562), so `import jobqueue.core.states` or the
emulator loads nothing of the store, the remote client or the API.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from jobqueue.version import __version__

if TYPE_CHECKING:
    from jobqueue.api import EventNotFound, InvalidOptions, JobNotFound, JobQueue, JobQueueError
    from jobqueue.core.records import Batch, Event, Job, RequestCounts
    from jobqueue.files.inputs import InputError

_EXPORTS = {
    "EventNotFound": "jobqueue.api",
    "Batch": "jobqueue.core.records",
    "Event": "jobqueue.core.records",
    "Job": "jobqueue.core.records",
    "RequestCounts": "jobqueue.core.records",
    "InputError": "jobqueue.files.inputs",
    "InvalidOptions": "jobqueue.api",
    "JobNotFound": "jobqueue.api",
    "JobQueue": "jobqueue.api",
    "JobQueueError": "jobqueue.api",
}

__all__ = [
    "Batch",
    "Event",
    "EventNotFound",
    "InputError",
    "InvalidOptions",
    "Job",
    "JobNotFound",
    "JobQueue",
    "JobQueueError",
    "RequestCounts",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jobqueue' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
