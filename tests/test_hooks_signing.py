"""Standard Webhooks signing: the REMOTE_API.md vector, rejections, the official SDK."""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest

from jobqueue.hooks.signing import (
    WebhookVerificationError,
    generate_secret,
    sign,
    signed_headers,
    verify,
)

SECRET = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c="
WEBHOOK_ID = "wh_685c059ae39c8190af8c71ed1022a24d"
TIMESTAMP = 1750861210
BODY = (
    b'{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", '
    b'"created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}'
)
SIGNATURE = "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY="


def vector_headers(**overrides: str) -> dict[str, str]:
    headers = {
        "webhook-id": WEBHOOK_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": SIGNATURE,
    }
    headers.update(overrides)
    return headers


def reason(exc: pytest.ExceptionInfo[WebhookVerificationError]) -> str:
    return exc.value.reason


# --- the test vector --------------------------------------------------------------------------


def test_sign_reproduces_the_vector() -> None:
    assert sign(SECRET, WEBHOOK_ID, TIMESTAMP, BODY) == SIGNATURE


def test_verify_accepts_the_vector() -> None:
    verify(SECRET, vector_headers(), BODY, now=TIMESTAMP)
    verify(SECRET, vector_headers(), BODY, now=TIMESTAMP + 300)  # at the edge of tolerance
    verify(SECRET, vector_headers(), BODY, now=TIMESTAMP - 300)


def test_verify_header_names_are_case_insensitive() -> None:
    headers = {k.title(): v for k, v in vector_headers().items()}
    assert "Webhook-Signature" in headers
    verify(SECRET, headers, BODY, now=TIMESTAMP)
    verify(SECRET, httpx.Headers(headers), BODY, now=TIMESTAMP)


# --- rejections -------------------------------------------------------------------------------


def test_rejects_tampered_body() -> None:
    with pytest.raises(WebhookVerificationError) as exc:
        verify(SECRET, vector_headers(), BODY.replace(b"resp_123", b"resp_124"), now=TIMESTAMP)
    assert "no matching v1 signature" in reason(exc)


def test_rejects_tampered_id_or_timestamp() -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, vector_headers(**{"webhook-id": "wh_other"}), BODY, now=TIMESTAMP)
    with pytest.raises(WebhookVerificationError):
        headers = vector_headers(**{"webhook-timestamp": str(TIMESTAMP + 1)})
        verify(SECRET, headers, BODY, now=TIMESTAMP)


def test_rejects_wrong_secret_and_never_echoes_it() -> None:
    other = generate_secret()
    with pytest.raises(WebhookVerificationError) as exc:
        verify(other, vector_headers(), BODY, now=TIMESTAMP)
    assert other not in str(exc.value) and other[6:] not in str(exc.value)
    assert SECRET not in str(exc.value)


def test_rejects_old_and_future_timestamps() -> None:
    with pytest.raises(WebhookVerificationError) as exc:
        verify(SECRET, vector_headers(), BODY, now=TIMESTAMP + 301)
    assert "too old" in reason(exc)
    with pytest.raises(WebhookVerificationError) as exc:
        verify(SECRET, vector_headers(), BODY, now=TIMESTAMP - 301)
    assert "future" in reason(exc)
    # With the real clock the 2025 vector is long stale.
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, vector_headers(), BODY)
    # A custom tolerance widens the window.
    verify(SECRET, vector_headers(), BODY, now=TIMESTAMP + 3600, tolerance=3600)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_rejects_missing_headers(missing: str) -> None:
    headers = vector_headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError) as exc:
        verify(SECRET, headers, BODY, now=TIMESTAMP)
    assert reason(exc) == f"missing header {missing}"
    with pytest.raises(WebhookVerificationError, match="missing header"):
        verify(SECRET, vector_headers(**{missing: "  "}), BODY, now=TIMESTAMP)


@pytest.mark.parametrize("value", ["abc", "1750861210.5", "-1750861210", "1_750_861_210", ""])
def test_rejects_non_integer_timestamp(value: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, vector_headers(**{"webhook-timestamp": value}), BODY, now=TIMESTAMP)


def test_rejects_signatures_of_other_versions_or_garbage() -> None:
    bare = SIGNATURE.removeprefix("v1,")
    for value in [bare, "v2," + bare, "v1a," + bare, "v1,", "v1,ünïcode", "v1"]:
        with pytest.raises(WebhookVerificationError, match="no matching"):
            verify(SECRET, vector_headers(**{"webhook-signature": value}), BODY, now=TIMESTAMP)


def test_several_signatures_one_matching() -> None:
    wrong = sign(generate_secret(), WEBHOOK_ID, TIMESTAMP, BODY)
    for value in [
        f"{wrong} {SIGNATURE}",
        f"{SIGNATURE} {wrong}",
        f"v1a,xyz  {wrong}\t{SIGNATURE}",
    ]:
        verify(SECRET, vector_headers(**{"webhook-signature": value}), BODY, now=TIMESTAMP)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, vector_headers(**{"webhook-signature": f"{wrong} {wrong}"}), BODY, now=0)


# --- secrets ----------------------------------------------------------------------------------


def test_generate_secret_shape() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:], validate=True)) == 32
    assert generate_secret() != secret


def test_unprefixed_secret_uses_its_bytes() -> None:
    raw = "plain-shared-secret"
    signature = sign(raw, "msg_1", 1000, b"{}")
    verify(raw, signed_headers(raw, "msg_1", b"{}", timestamp=1000), b"{}", now=1000)
    # Same key either way: `whsec_` + base64(raw) is the raw secret.
    encoded = "whsec_" + base64.b64encode(raw.encode()).decode()
    assert sign(encoded, "msg_1", 1000, b"{}") == signature


def test_bad_secret_is_reported_without_echo() -> None:
    bad = "whsec_not*base64!"
    with pytest.raises(ValueError) as exc:
        sign(bad, "id", 1, b"")
    assert bad not in str(exc.value) and "not*base64" not in str(exc.value)
    with pytest.raises(WebhookVerificationError) as vexc:
        verify(bad, vector_headers(), BODY, now=TIMESTAMP)
    assert "not*base64" not in str(vexc.value)
    with pytest.raises(ValueError):
        sign("", "id", 1, b"")


def test_signed_headers() -> None:
    before = int(time.time())
    headers = signed_headers(SECRET, WEBHOOK_ID, BODY)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == WEBHOOK_ID
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    verify(SECRET, headers, BODY)
    fixed = signed_headers(SECRET, WEBHOOK_ID, BODY, timestamp=TIMESTAMP)
    assert fixed["webhook-signature"] == SIGNATURE
    assert "webhook-signature" not in signed_headers(None, WEBHOOK_ID, BODY)


# --- interoperability with the official SDK ----------------------------------------------------


def test_official_sdk_verifies_jobqueue_signatures() -> None:
    secret = generate_secret()
    body = b'{"id":"evt_1","type":"job.completed","data":{"n":"\xc3\xa9"}}'
    headers = signed_headers(secret, "evt_1", body)
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    client.webhooks.verify_signature(body, headers)
    client.webhooks.verify_signature(body.decode(), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body.replace(b"evt_1", b"evt_2"), headers)


def test_official_sdk_and_jobqueue_agree_on_fresh_vector_signature() -> None:
    now = int(time.time())
    headers = signed_headers(SECRET, WEBHOOK_ID, BODY, timestamp=now)
    openai.OpenAI(api_key="x").webhooks.verify_signature(BODY, headers, secret=SECRET)
    verify(SECRET, headers, BODY)
