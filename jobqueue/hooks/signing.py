"""Standard Webhooks signing and verification, compatible with OpenAI's own webhooks.

A message is signed as `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`.
The key is the base64 decoding of the secret after its `whsec_` prefix, or the secret's UTF-8
bytes when it has no prefix. `webhook-signature` holds space-separated `v1,<sig>` entries, any
of which may match (that is how a sender rotates secrets without dropping messages).

Secrets never appear in exception messages, reprs, or logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping

__all__ = [
    "DEFAULT_TOLERANCE",
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "generate_secret",
    "secret_key",
    "sign",
    "signed_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300
_TIMESTAMP = re.compile(r"[0-9]{1,15}")


class WebhookVerificationError(Exception):
    """A webhook failed verification; `reason` says why (it never contains the secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def generate_secret() -> str:
    """A fresh secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key for `secret`; raises ValueError (without echoing it) if it is unusable."""
    if not secret:
        raise ValueError("webhook secret is empty")
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret is not valid base64 after its whsec_ prefix") from None
        if not key:
            raise ValueError("webhook secret is empty after its whsec_ prefix")
        return key
    return secret.encode("utf-8")


def _signature(key: bytes, webhook_id: str, timestamp: str, body: bytes) -> str:
    # Sign bytes, not a decoded str: identical to the SDK for UTF-8 bodies, and total otherwise.
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode("ascii")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one message: `v1,<base64>`."""
    return "v1," + _signature(secret_key(secret), webhook_id, str(int(timestamp)), body)


def signed_headers(
    secret: str | None, webhook_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """Headers for one delivery attempt; with no secret the message is sent unsigned."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "content-type": "application/json",
    }
    if secret is not None:
        headers["webhook-signature"] = sign(secret, webhook_id, ts, body)
    return headers


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        # Plain dicts are case-sensitive; httpx/starlette headers are not and hit above.
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    if value is None or not value.strip():
        raise WebhookVerificationError(f"missing header {name}")
    return value.strip()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless `body` and `headers` carry a valid signature.

    Checks, in order: the three headers are present, the timestamp is an integer within
    `tolerance` seconds of `now` (either way, against replays and clock games), and one `v1,`
    entry of the signature list matches. Comparison is constant-time.
    """
    webhook_id = _header(headers, "webhook-id")
    timestamp = _header(headers, "webhook-timestamp")
    signature_list = _header(headers, "webhook-signature")

    if not _TIMESTAMP.fullmatch(timestamp):
        raise WebhookVerificationError("webhook-timestamp is not an integer number of seconds")
    current = int(time.time() if now is None else now)
    age = current - int(timestamp)
    if age > tolerance:
        raise WebhookVerificationError(f"webhook timestamp is too old ({age}s > {tolerance}s)")
    if -age > tolerance:
        raise WebhookVerificationError(
            f"webhook timestamp is in the future ({-age}s > {tolerance}s)"
        )

    try:
        key = secret_key(secret)
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    expected = _signature(key, webhook_id, timestamp, body).encode("ascii")
    matched = False
    for entry in signature_list.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue  # other schemes (e.g. v1a asymmetric) are not ours to check
        # Bytes, so a non-ASCII entry cannot make compare_digest raise; no early exit.
        matched |= hmac.compare_digest(expected, value.encode("utf-8", "replace"))
    if not matched:
        raise WebhookVerificationError("no matching v1 signature in webhook-signature")
