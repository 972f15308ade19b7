"""Hooks: event patterns, Standard Webhooks signing, and the sinks events are delivered to."""

from jobqueue.hooks.patterns import matches
from jobqueue.hooks.signing import (
    WebhookVerificationError,
    generate_secret,
    sign,
    signed_headers,
    verify,
)
from jobqueue.hooks.sinks import (
    CommandSink,
    DeliveryError,
    PythonSink,
    Sink,
    WebhookSink,
    backoff,
    build_sinks,
    close_sinks,
    event_body,
    sink_matches,
)

__all__ = [
    "CommandSink",
    "DeliveryError",
    "PythonSink",
    "Sink",
    "WebhookSink",
    "WebhookVerificationError",
    "backoff",
    "build_sinks",
    "close_sinks",
    "event_body",
    "generate_secret",
    "matches",
    "sign",
    "signed_headers",
    "sink_matches",
    "verify",
]
