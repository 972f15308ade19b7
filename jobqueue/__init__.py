"""jobqueue: a durable job queue for OpenAI-style Batch APIs."""

from jobqueue.api import InvalidOptions, JobNotFound, JobQueue, JobQueueError
from jobqueue.inputs import InputError
from jobqueue.records import Batch, Event, Job, RequestCounts

__version__ = "0.1.0"
__all__ = [
    "Batch",
    "Event",
    "InputError",
    "InvalidOptions",
    "Job",
    "JobNotFound",
    "JobQueue",
    "JobQueueError",
    "RequestCounts",
]
