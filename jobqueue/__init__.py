"""jobqueue: a durable job queue for OpenAI-style Batch APIs."""

__version__ = "0.1.0"
