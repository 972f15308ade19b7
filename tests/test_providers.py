"""The remote client against scripted `httpx.MockTransport` responses: no network, no sleeping."""

from __future__ import annotations

import contextlib
import email.utils
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from jobqueue.remote import (
    AzureOpenAIProvider,
    IncompleteDownloadError,
    NotFoundError,
    OpenAIProvider,
    PermanentRemoteError,
    Provider,
    RemoteBatch,
    RemoteError,
    RequestCounts,
    TransientRemoteError,
    make_provider,
)

KEY = "sk-test-SECRET-0123456789"
BASE = "https://api.test/v1"

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Script:
    """Answers requests with the scripted replies in order; records the requests."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        if not self.replies:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)


def make(script: Script, *, cls: type[OpenAIProvider] = OpenAIProvider, **kw: Any) -> Any:
    delays: list[float] = []
    kw.setdefault("max_retries", 5)
    provider = cls(
        kw.pop("base_url", BASE),
        kw.pop("api_key", KEY),
        transport=httpx.MockTransport(script),
        sleep=delays.append,
        rng=random.Random(7),
        **kw,
    )
    provider.delays = delays
    return provider


def jresp(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers={"x-request-id": "req_1", **headers})


def err(status: int, message: str = "nope", **fields: Any) -> httpx.Response:
    headers = fields.pop("headers", {})
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": None,
            **fields,
        }
    }
    return jresp(status, body, **headers)


def plain(status: int, **headers: str) -> httpx.Response:
    """An error answer without a `type`, like a gateway or overloaded server sends."""
    return httpx.Response(status, json={"error": {"message": "busy"}}, headers=headers)


def batch(batch_id: str = "batch_1", **fields: Any) -> dict[str, Any]:
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file_in",
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": 1_700_000_000,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": {},
        "errors": None,
        **fields,
    }


FILE = {
    "id": "file_1",
    "object": "file",
    "bytes": 11,
    "created_at": 1_700_000_000,
    "expires_at": 1_700_003_600,
    "filename": "in.jsonl",
    "purpose": "batch",
    "status": "processed",
}


def expected_backoff(attempts: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [min(0.5 * 2**i, 8) * (1 - 0.25 * rng.random()) for i in range(attempts)]


# -- request shapes and parsing ---------------------------------------------------------------


def test_upload_file_is_multipart_with_expiry(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    payload = b'{"custom_id": "a"}\n' * 10_000  # bigger than one multipart chunk
    src.write_bytes(payload)
    script = Script(jresp(200, FILE))
    with make(script) as p:
        f = p.upload_file(src, "jq_b1.jsonl", expires_after=3600)
    req, body = script.requests[0], script.bodies[0]
    assert (req.method, req.url.path) == ("POST", "/v1/files")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(req.headers["content-length"]) == len(body)
    assert b'name="purpose"\r\n\r\nbatch\r\n' in body
    assert b'name="expires_after[anchor]"\r\n\r\ncreated_at\r\n' in body
    assert b'name="expires_after[seconds]"\r\n\r\n3600\r\n' in body
    assert b'name="file"; filename="jq_b1.jsonl"' in body
    assert payload in body
    assert f.id == "file_1" and f.bytes == 11 and f.status == "processed"
    assert f.expires_at == 1_700_003_600 and f.purpose == "batch"


def test_upload_without_expiry_and_retry_resends_whole_file(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"x" * 200_000)
    script = Script(plain(500), jresp(200, FILE))
    p = make(script)
    p.upload_file(src, "in.jsonl")
    assert len(script.requests) == 2
    assert all(b"x" * 200_000 in b for b in script.bodies)
    assert b"expires_after" not in script.bodies[0]


def test_create_batch_request_and_parse() -> None:
    script = Script(jresp(200, batch(metadata={"jobqueue_batch_id": "b_1"})))
    p = make(script)
    b = p.create_batch(
        input_file_id="file_in",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"jobqueue_batch_id": "b_1"},
        output_expires_after=86400,
    )
    req = script.requests[0]
    assert (req.method, req.url.path) == ("POST", "/v1/batches")
    assert req.headers["content-type"] == "application/json"
    assert json.loads(script.bodies[0]) == {
        "input_file_id": "file_in",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"jobqueue_batch_id": "b_1"},
        "output_expires_after": {"anchor": "created_at", "seconds": 86400},
    }
    assert b.status == "validating" and b.metadata == {"jobqueue_batch_id": "b_1"}
    assert b.errors == [] and b.usage is None


def test_create_batch_without_output_expiry() -> None:
    script = Script(jresp(200, batch()))
    make(script).create_batch(
        input_file_id="f",
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={},
        output_expires_after=None,
    )
    assert "output_expires_after" not in json.loads(script.bodies[0])


def test_retrieve_batch_parses_everything() -> None:
    full = batch(
        status="failed",
        model="gpt-4o-mini",
        output_file_id="file_out",
        error_file_id="file_err",
        in_progress_at=1_700_000_010,
        expires_at=1_700_086_400,
        finalizing_at=1_700_000_020,
        completed_at=None,
        failed_at=1_700_000_030,
        request_counts={"total": 3, "completed": 2, "failed": 1},
        metadata={"jobqueue_batch_id": "b_1"},
        errors={
            "object": "list",
            "data": [{"code": "invalid_json_line", "line": 2, "message": "bad", "param": None}],
        },
        usage={"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
    )
    script = Script(jresp(200, full))
    b = make(script).retrieve_batch("batch_1")
    assert (script.requests[0].method, script.requests[0].url.path) == (
        "GET",
        "/v1/batches/batch_1",
    )
    assert b.status == "failed" and b.model == "gpt-4o-mini"
    assert (b.output_file_id, b.error_file_id) == ("file_out", "file_err")
    assert (b.in_progress_at, b.finalizing_at, b.failed_at) == (
        1_700_000_010,
        1_700_000_020,
        1_700_000_030,
    )
    assert b.completed_at is None and b.expires_at == 1_700_086_400
    assert b.request_counts == RequestCounts(total=3, completed=2, failed=1)
    assert b.errors == [{"code": "invalid_json_line", "line": 2, "message": "bad", "param": None}]
    assert b.usage == {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
    assert b.raw == full


def test_from_api_tolerates_missing_and_null_fields() -> None:
    b = RemoteBatch.from_api(
        {
            "id": "batch_x",
            "status": "in_progress",
            "request_counts": None,
            "metadata": None,
            "errors": None,
            "usage": "?",
        }
    )
    assert b.id == "batch_x" and b.endpoint == "" and b.input_file_id == ""
    assert b.request_counts.total == 0 and b.metadata == {} and b.errors == []
    assert b.usage is None and b.model is None and b.created_at is None
    assert RemoteBatch.from_api({"errors": [{"code": "x"}]}).errors == [{"code": "x"}]


def test_ids_are_quoted_into_paths() -> None:
    script = Script(jresp(200, batch()))
    make(script).retrieve_batch("../files/x")
    assert script.requests[0].url.raw_path == b"/v1/batches/..%2Ffiles%2Fx"


def test_list_batches_params_and_page() -> None:
    page = {
        "object": "list",
        "data": [batch("batch_3"), batch("batch_2")],
        "first_id": "batch_3",
        "last_id": "batch_2",
        "has_more": True,
    }
    script = Script(jresp(200, page), jresp(200, {"object": "list", "data": []}))
    p = make(script)
    got = p.list_batches(after="batch_9", limit=50)
    assert script.requests[0].url.params == httpx.QueryParams({"limit": "50", "after": "batch_9"})
    assert [b.id for b in got.data] == ["batch_3", "batch_2"]
    assert got.has_more and (got.first_id, got.last_id) == ("batch_3", "batch_2")
    empty = p.list_batches()
    assert script.requests[1].url.params == httpx.QueryParams({"limit": "100"})
    assert empty.data == [] and not empty.has_more and empty.last_id is None


def test_cancel_retrieve_and_delete_file() -> None:
    script = Script(
        jresp(200, batch(status="cancelling", cancelling_at=1_700_000_100)),
        jresp(200, FILE),
        jresp(200, {"id": "file_1", "object": "file", "deleted": True}),
        err(404, "No such File object: file_1", code=None),
    )
    p = make(script)
    assert p.cancel_batch("batch_1").cancelling_at == 1_700_000_100
    assert p.retrieve_file("file_1").filename == "in.jsonl"
    p.delete_file("file_1")
    p.delete_file("file_1")  # 404: already gone, fine
    shapes = [(r.method, r.url.path) for r in script.requests]
    assert shapes == [
        ("POST", "/v1/batches/batch_1/cancel"),
        ("GET", "/v1/files/file_1"),
        ("DELETE", "/v1/files/file_1"),
        ("DELETE", "/v1/files/file_1"),
    ]
    assert p.delays == []


def test_no_key_sends_no_authorization() -> None:
    script = Script(jresp(200, batch()))
    make(script, api_key=None).retrieve_batch("batch_1")
    assert "authorization" not in script.requests[0].headers
    assert script.requests[0].headers["user-agent"].startswith("jobqueue/")


def test_is_a_provider() -> None:
    assert isinstance(make(Script()), Provider)
    assert OpenAIProvider.max_requests_per_file == 50_000


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_status_is_retried(status: int) -> None:
    script = Script(plain(status), jresp(200, batch()))
    p = make(script)
    assert p.retrieve_batch("batch_1").id == "batch_1"
    assert len(script.requests) == 2
    assert p.delays == pytest.approx(expected_backoff(1))


def test_backoff_grows_capped_with_jitter_then_gives_up() -> None:
    script = Script(*[plain(500, **{"x-request-id": "req_9"}) for _ in range(8)])
    p = make(script, max_retries=7)
    with pytest.raises(TransientRemoteError) as info:
        p.retrieve_batch("batch_1")
    assert len(script.requests) == 8
    assert p.delays == pytest.approx(expected_backoff(7))
    assert max(p.delays) <= 8 and min(p.delays[5:]) >= 6  # capped at 8, jitter at most 25%
    e = info.value
    assert e.status == 500 and e.retryable and not e.maybe_created
    assert e.request_id == "req_9" and e.message == "busy"


def test_max_retries_zero_means_one_attempt() -> None:
    script = Script(plain(503))
    with pytest.raises(TransientRemoteError):
        make(script, max_retries=0).retrieve_batch("batch_1")
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("slow"),
        httpx.ConnectTimeout("slow"),
        httpx.PoolTimeout("busy"),
        httpx.ConnectError("refused"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("peer closed connection"),
    ],
)
def test_transport_errors_are_retried(exc: Exception) -> None:
    script = Script(exc, exc, jresp(200, batch()))
    p = make(script)
    assert p.retrieve_batch("batch_1").id == "batch_1"
    assert len(script.requests) == 3 and len(p.delays) == 2


def test_transport_errors_exhausted_raise_transient() -> None:
    script = Script(*[httpx.ConnectError("refused")] * 3)
    with pytest.raises(TransientRemoteError) as info:
        make(script, max_retries=2).retrieve_file("file_1")
    assert "ConnectError" in info.value.message and info.value.status is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_unsupported_protocol_is_permanent() -> None:
    p = OpenAIProvider("ftp://nowhere/v1", None, sleep=lambda s: None)
    with pytest.raises(PermanentRemoteError):
        p.retrieve_batch("b")


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # ms wins, as in the SDK
        ({"retry-after": "120"}, 120.0),
    ],
)
def test_retry_after_is_honoured(headers: dict[str, str], delay: float) -> None:
    script = Script(err(429, "slow down", headers=headers), jresp(200, batch()))
    p = make(script)
    p.retrieve_batch("batch_1")
    assert p.delays == [delay]


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = Script(plain(503, **{"retry-after": when}), jresp(200, batch()))
    p = make(script)
    p.retrieve_batch("batch_1")
    assert 28 <= p.delays[0] <= 31


@pytest.mark.parametrize("value", ["300", "0", "-1", "soon", "121"])
def test_retry_after_out_of_range_falls_back_to_backoff(value: str) -> None:
    script = Script(plain(429, **{"retry-after": value}), jresp(200, batch()))
    p = make(script)
    p.retrieve_batch("batch_1")
    assert p.delays == pytest.approx(expected_backoff(1))


def test_x_should_retry_false_wins_over_status() -> None:
    script = Script(plain(500, **{"x-should-retry": "false"}))
    p = make(script)
    with pytest.raises(PermanentRemoteError) as info:
        p.retrieve_batch("batch_1")
    assert info.value.status == 500 and not info.value.retryable
    assert len(script.requests) == 1 and p.delays == []


def test_x_should_retry_true_wins_over_status() -> None:
    script = Script(err(400, headers={"x-should-retry": "true"}), jresp(200, batch()))
    p = make(script)
    assert p.retrieve_batch("batch_1").id == "batch_1"
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    ("status", "cls", "code", "param"),
    [
        (400, PermanentRemoteError, "invalid_value", "endpoint"),
        (401, PermanentRemoteError, "invalid_api_key", None),
        (403, PermanentRemoteError, None, None),
        (404, NotFoundError, None, None),
        (422, PermanentRemoteError, "bad", "metadata"),
    ],
)
def test_permanent_errors_raise_at_once(
    status: int, cls: type[RemoteError], code: str | None, param: str | None
) -> None:
    script = Script(err(status, "it is wrong", code=code, param=param))
    p = make(script)
    with pytest.raises(cls) as info:
        p.retrieve_batch("batch_1")
    e = info.value
    assert type(e) is cls and not e.retryable
    assert (e.status, e.code, e.param, e.message) == (status, code, param, "it is wrong")
    assert e.type == "invalid_request_error" and e.request_id == "req_1"
    assert "it is wrong" in str(e) and f"status={status}" in str(e)
    assert len(script.requests) == 1 and p.delays == []


def test_non_json_error_body_is_tolerated() -> None:
    html = httpx.Response(502, text="<html><body>Bad Gateway</body></html>")
    script = Script(html, html)
    with pytest.raises(TransientRemoteError) as info:
        make(script, max_retries=1).retrieve_batch("batch_1")
    assert info.value.status == 502 and "Bad Gateway" in info.value.message
    assert info.value.code is None


def test_non_json_success_body_is_transient() -> None:
    script = Script(httpx.Response(200, text="<html>login</html>"))
    with pytest.raises(TransientRemoteError):
        make(script).retrieve_batch("batch_1")


# -- 409 --------------------------------------------------------------------------------------


def test_cancel_of_a_finished_batch_is_permanent() -> None:
    msg = "Cannot cancel a batch with status 'completed'."
    # Even an (unlikely) x-should-retry: true does not make this retryable.
    script = Script(err(409, msg, headers={"x-should-retry": "true"}))
    p = make(script)
    with pytest.raises(PermanentRemoteError) as info:
        p.cancel_batch("batch_1")
    e = info.value
    assert (e.status, e.message, e.type) == (409, msg, "invalid_request_error")
    assert len(script.requests) == 1 and p.delays == []


def test_cancel_409_without_type_is_permanent_too() -> None:
    script = Script(plain(409))
    with pytest.raises(PermanentRemoteError):
        make(script).cancel_batch("batch_1")
    assert len(script.requests) == 1


def test_cancel_is_retried_on_5xx() -> None:
    script = Script(plain(500), jresp(200, batch(status="cancelling")))
    assert make(script).cancel_batch("batch_1").status == "cancelling"


def test_409_invalid_request_elsewhere_is_permanent_lock_conflict_is_not() -> None:
    script = Script(err(409, "state conflict"))
    with pytest.raises(PermanentRemoteError):
        make(script).retrieve_batch("batch_1")
    script = Script(plain(409), jresp(200, batch()))
    assert make(script).retrieve_batch("batch_1").id == "batch_1"


# -- create_batch is not idempotent -----------------------------------------------------------


def _create(p: OpenAIProvider) -> RemoteBatch:
    return p.create_batch(
        input_file_id="file_in",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"jobqueue_batch_id": "b_1"},
        output_expires_after=None,
    )


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("slow"),
        httpx.WriteTimeout("slow"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("peer closed"),
        plain(502),
        plain(504),
    ],
)
def test_create_batch_not_retried_when_it_may_have_been_created(failure: Reply) -> None:
    script = Script(failure, jresp(200, batch()))
    p = make(script)
    with pytest.raises(TransientRemoteError) as info:
        _create(p)
    assert info.value.maybe_created is True and info.value.retryable
    assert len(script.requests) == 1 and p.delays == []


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow"),
        plain(429),
        plain(500),
        plain(503),
        plain(408),
    ],
)
def test_create_batch_retried_when_the_server_said_no(failure: Reply) -> None:
    script = Script(failure, jresp(200, batch()))
    p = make(script)
    assert _create(p).id == "batch_1"
    assert len(script.requests) == 2


def test_create_batch_exhausted_on_429_is_not_maybe_created() -> None:
    script = Script(*[plain(429)] * 3)
    with pytest.raises(TransientRemoteError) as info:
        _create(make(script, max_retries=2))
    assert info.value.maybe_created is False


def test_max_call_seconds_bounds_a_create_retries_included() -> None:
    """(max_retries + 1) attempts of connect + request timeout, and 8 s of sleep per retry."""
    assert make(Script(), timeout=60.0, max_retries=5).max_call_seconds == 6 * 70 + 5 * 8
    assert make(Script(), timeout=3.0, max_retries=2).max_call_seconds == 3 * 6 + 2 * 8
    assert make(Script(), timeout=30.0, max_retries=0).max_call_seconds == 40
    assert make(Script(), cls=AzureOpenAIProvider, timeout=5.0).max_call_seconds == 6 * 10 + 40


def test_a_create_gives_up_rather_than_sleep_past_its_bound() -> None:
    """A Retry-After honoured elsewhere (up to 120 s) would take a create past the bound its
    lease was renewed for: the create gives up instead, as after its last retry."""
    script = Script(err(429, "slow down", headers={"retry-after": "60"}), jresp(200, batch()))
    p = make(script)
    with pytest.raises(TransientRemoteError) as info:
        _create(p)
    assert not info.value.maybe_created and len(script.requests) == 1 and p.delays == []
    # Short waits within the budget are made as before, up to the budget.
    script = Script(*[err(429, "slow down", headers={"retry-after": "7"})] * 6, jresp(200, batch()))
    p = make(script)
    with pytest.raises(TransientRemoteError):
        _create(p)
    assert p.delays == [7.0] * 5 and sum(p.delays) <= p.max_call_seconds
    script = Script(err(429, "slow down", headers={"retry-after": "7"}), jresp(200, batch()))
    assert _create(make(script)).id == "batch_1"
    # Other calls keep honouring the long wait.
    script = Script(err(429, "slow down", headers={"retry-after": "60"}), jresp(200, batch()))
    p = make(script)
    assert p.retrieve_batch("batch_1").id == "batch_1" and p.delays == [60.0]


def test_create_batch_bad_request_is_permanent() -> None:
    script = Script(err(400, "bad endpoint", code="invalid_value", param="endpoint"))
    with pytest.raises(PermanentRemoteError) as info:
        _create(make(script))
    assert (info.value.code, info.value.param) == ("invalid_value", "endpoint")


# -- find_batch_by_metadata -------------------------------------------------------------------


def _page(ids_created: list[tuple[str, int, str | None]], has_more: bool) -> httpx.Response:
    data = [
        batch(i, created_at=c, metadata={"jobqueue_batch_id": m} if m else {})
        for i, c, m in ids_created
    ]
    return jresp(
        200,
        {
            "object": "list",
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
        },
    )


def test_find_batch_by_metadata_walks_pages() -> None:
    script = Script(
        _page([("batch_9", 900, None), ("batch_8", 800, "other")], True),
        _page([("batch_7", 700, "b_1"), ("batch_6", 600, "b_1")], True),
    )
    found = make(script).find_batch_by_metadata("jobqueue_batch_id", "b_1")
    assert found is not None and found.id == "batch_7"  # the newest match
    assert "after" not in script.requests[0].url.params
    assert script.requests[1].url.params["after"] == "batch_8"
    assert script.requests[1].url.params["limit"] == "100"


def test_find_batch_by_metadata_stops_at_created_after() -> None:
    script = Script(
        _page([("batch_9", 900, None), ("batch_8", 800, None)], True),
        _page([("batch_7", 700, None), ("batch_6", 600, "b_1")], True),
    )
    p = make(script)
    assert p.find_batch_by_metadata("jobqueue_batch_id", "b_1", created_after=650) is None
    assert len(script.requests) == 2  # page 3 never fetched


def test_find_batch_by_metadata_respects_max_pages_and_end() -> None:
    script = Script(*[_page([(f"batch_{i}", 1000 - i, None)], True) for i in range(3)])
    assert make(script).find_batch_by_metadata("k", "v", max_pages=3) is None
    assert len(script.requests) == 3
    script = Script(_page([("batch_1", 1, None)], False))
    assert make(script).find_batch_by_metadata("k", "v") is None
    assert len(script.requests) == 1


# -- downloads --------------------------------------------------------------------------------


class Cut(httpx.SyncByteStream):
    """Yields `data` in small pieces, then drops the connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), 1000):
            yield self.data[i : i + 1000]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


DATA = bytes(range(256)) * 12_000  # ~3 MiB: several 1 MiB writes


def _ranged(data: bytes) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
        return httpx.Response(
            206,
            content=data[start:],
            headers={"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
        )

    return reply


def test_download_is_whole_and_atomic(tmp_path: Path) -> None:
    script = Script(httpx.Response(200, content=DATA))
    dest = tmp_path / "out" / "res.jsonl"
    n = make(script).download_file("file_out", dest, expected_bytes=len(DATA))
    assert n == len(DATA) and dest.read_bytes() == DATA
    assert not dest.with_suffix(".jsonl.part").exists()
    req = script.requests[0]
    assert (req.method, req.url.path) == ("GET", "/v1/files/file_out/content")
    assert req.headers["accept-encoding"] == "identity" and "range" not in req.headers


def test_download_looks_up_the_size_when_not_given(tmp_path: Path) -> None:
    script = Script(jresp(200, {**FILE, "bytes": len(DATA)}), httpx.Response(200, content=DATA))
    assert make(script).download_file("file_1", tmp_path / "r") == len(DATA)
    assert script.requests[0].url.path == "/v1/files/file_1"


def test_cut_short_download_resumes_with_range(tmp_path: Path) -> None:
    cut_at = 1_500_000
    script = Script(
        httpx.Response(200, stream=Cut(DATA[:cut_at]), headers={"content-length": str(len(DATA))}),
        _ranged(DATA),
    )
    dest = tmp_path / "r.jsonl"
    p = make(script)
    assert p.download_file("file_out", dest, expected_bytes=len(DATA)) == len(DATA)
    assert dest.read_bytes() == DATA
    assert script.requests[1].headers["range"].startswith("bytes=")
    assert len(p.delays) == 1


def test_cut_short_download_restarts_when_range_is_ignored(tmp_path: Path) -> None:
    script = Script(
        httpx.Response(200, stream=Cut(DATA[:5000])),
        httpx.Response(200, content=DATA),  # the server ignores Range: full body again
    )
    dest = tmp_path / "r.jsonl"
    assert make(script).download_file("f", dest, expected_bytes=len(DATA)) == len(DATA)
    assert dest.read_bytes() == DATA


def test_short_body_without_error_is_retried(tmp_path: Path) -> None:
    script = Script(httpx.Response(200, content=DATA[:100]), httpx.Response(200, content=DATA))
    dest = tmp_path / "r"
    assert make(script).download_file("f", dest, expected_bytes=len(DATA)) == len(DATA)
    assert dest.read_bytes() == DATA


def test_download_that_never_matches_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "r.jsonl"
    dest_part = tmp_path / "r.jsonl.part"
    dest_part.write_bytes(b"stale from a crash")
    script = Script(*[httpx.Response(200, content=DATA[:-1]) for _ in range(4)])
    p = make(script, max_retries=3)
    with pytest.raises(IncompleteDownloadError) as info:
        p.download_file("f", dest, expected_bytes=len(DATA))
    assert info.value.retryable
    assert len(script.requests) == 4 and len(p.delays) == 3
    assert not dest.exists() and not dest_part.exists()


def test_download_longer_than_expected_fails(tmp_path: Path) -> None:
    script = Script(*[httpx.Response(200, content=DATA + b"!") for _ in range(2)])
    with pytest.raises(IncompleteDownloadError):
        make(script, max_retries=1).download_file("f", tmp_path / "r", expected_bytes=len(DATA))
    assert list(tmp_path.iterdir()) == []


def test_download_content_length_mismatch_is_retried(tmp_path: Path) -> None:
    script = Script(
        httpx.Response(200, content=b"abc", headers={"content-length": "3"}),
        httpx.Response(200, content=b"abcd"),
    )
    assert make(script).download_file("f", tmp_path / "r", expected_bytes=4) == 4


def test_download_not_found_is_permanent_and_clean(tmp_path: Path) -> None:
    script = Script(err(404, "No such File object"))
    p = make(script)
    with pytest.raises(NotFoundError):
        p.download_file("f", tmp_path / "r", expected_bytes=10)
    assert list(tmp_path.iterdir()) == [] and p.delays == []


def test_download_retries_5xx_with_retry_after(tmp_path: Path) -> None:
    script = Script(plain(503, **{"retry-after": "4"}), httpx.Response(200, content=b"ok"))
    p = make(script)
    assert p.download_file("f", tmp_path / "r", expected_bytes=2) == 2
    assert p.delays == [4.0]


def test_download_empty_file(tmp_path: Path) -> None:
    script = Script(httpx.Response(200, content=b""))
    assert make(script).download_file("f", tmp_path / "r", expected_bytes=0) == 0
    assert (tmp_path / "r").read_bytes() == b""


def test_download_read_timeout_then_success(tmp_path: Path) -> None:
    script = Script(httpx.ReadTimeout("slow"), httpx.Response(200, content=b"abc"))
    assert make(script).download_file("f", tmp_path / "r", expected_bytes=3) == 3


# -- secrets ----------------------------------------------------------------------------------


def test_key_never_in_logs_reprs_or_errors() -> None:
    echo = httpx.Response(
        401,
        json={
            "error": {
                "message": f"Incorrect API key provided: {KEY}",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        },
    )
    script = Script(plain(500), httpx.ReadTimeout("slow"), jresp(200, batch()), echo)
    p = make(script)
    with capture_logs() as logs:
        p.retrieve_batch("batch_1")
        with pytest.raises(PermanentRemoteError) as info:
            p.retrieve_batch("batch_1")
    assert logs, "expected log lines"
    for entry in logs:
        for field in ("method", "path", "status", "attempt", "request_id"):
            assert field in entry, (field, entry)
    assert KEY not in repr(logs)
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert KEY not in info.value.message and "<redacted>" in info.value.message
    assert KEY not in repr(p) and KEY not in str(p)
    assert KEY not in repr(p._client.auth) and KEY not in repr(p._client.headers)
    assert not any(KEY in str(v) for k, v in vars(p).items() if not k.startswith("_"))


def test_retry_log_names_request_id_and_attempt() -> None:
    script = Script(plain(503, **{"x-request-id": "req_abc"}), jresp(200, batch()))
    with capture_logs() as logs:
        make(script).retrieve_batch("batch_1")
    retry = next(e for e in logs if e["event"] == "remote.retry")
    assert retry["request_id"] == "req_abc" and retry["attempt"] == 0
    assert retry["status"] == 503 and retry["method"] == "GET"
    assert retry["path"] == "/v1/batches/batch_1"


# -- Azure ------------------------------------------------------------------------------------


def test_azure_uses_api_key_header_and_api_version() -> None:
    script = Script(jresp(200, batch(), **{"apim-request-id": "az_1"}), plain(404))
    p = make(
        script,
        cls=AzureOpenAIProvider,
        base_url="https://res.openai.azure.com/openai/v1",
        api_version="preview",
        deployments={"gpt-4o": "gpt-4o-batch"},
    )
    p.retrieve_batch("batch_1")
    req = script.requests[0]
    assert req.headers["api-key"] == KEY and "authorization" not in req.headers
    assert req.url.path == "/openai/v1/batches/batch_1"
    assert req.url.params["api-version"] == "preview"
    assert p.name == "azure" and p.max_requests_per_file == 100_000
    assert p.deployment_for("gpt-4o") == "gpt-4o-batch" and p.deployment_for("x") == "x"
    assert KEY not in repr(p) and KEY not in repr(p._client.auth)
    with pytest.raises(NotFoundError):
        p.retrieve_batch("nope")


def test_azure_request_id_fallback() -> None:
    script = Script(
        httpx.Response(400, json={"error": {"message": "bad"}}, headers={"apim-request-id": "az_9"})
    )
    with pytest.raises(PermanentRemoteError) as info:
        make(script, cls=AzureOpenAIProvider).retrieve_batch("b")
    assert info.value.request_id == "az_9"


# -- make_provider ----------------------------------------------------------------------------


def _settings(**kw: Any) -> SimpleNamespace:
    base = {
        "provider": "openai",
        "base_url": "https://api.openai.com/v1",
        "api_key": None,
        "request_timeout": 12.0,
        "max_retries": 2,
    }
    return SimpleNamespace(**{**base, **kw})


def test_make_provider_needs_a_key_for_real_openai() -> None:
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_provider(_settings())
    with pytest.raises(ValueError):
        make_provider(_settings(provider="azure", base_url="https://r.openai.azure.com/openai/v1"))


def test_make_provider_builds_each_kind() -> None:
    p = make_provider(_settings(api_key=SecretStr(KEY)))
    assert type(p) is OpenAIProvider and p._api_key == KEY and p._max_retries == 2
    local = make_provider(_settings(base_url="http://127.0.0.1:8321/v1"))
    assert type(local) is OpenAIProvider and local._api_key is None
    az = make_provider(
        _settings(
            provider="azure",
            api_key=SecretStr(KEY),
            base_url="https://r.openai.azure.com/openai/v1",
        )
    )
    assert isinstance(az, AzureOpenAIProvider)
    with pytest.raises(ValueError, match="unknown provider"):
        make_provider(_settings(provider="anthropic", api_key=SecretStr(KEY)))
    for prov in (p, local, az):
        prov.close()


def test_make_provider_with_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobqueue.settings import Settings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = Settings(base_url="http://localhost:9/v1")
    with make_provider(s) as p:
        assert p.base_url == "http://localhost:9/v1"


# -- over a real socket: what httpx raises when a server misbehaves -----------------------------


class _Server(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    downloads = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).downloads += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        if type(self).downloads == 1:  # first time: hang up a third of the way in
            self.wfile.write(DATA[: len(DATA) // 3])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(DATA)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.5)  # longer than the client's read timeout
        with contextlib.suppress(OSError):  # the client has hung up by now
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")


@pytest.fixture
def server() -> Iterator[str]:
    _Server.downloads = 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_real_socket_dropped_download_is_retried(server: str, tmp_path: Path) -> None:
    delays: list[float] = []
    with OpenAIProvider(server, KEY, sleep=delays.append) as p:
        dest = tmp_path / "out.jsonl"
        assert p.download_file("file_1", dest, expected_bytes=len(DATA)) == len(DATA)
    assert dest.read_bytes() == DATA and len(delays) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]


def test_real_socket_create_timeout_is_maybe_created(server: str) -> None:
    p = OpenAIProvider(server, KEY, timeout=0.2, sleep=lambda s: None)
    with p, pytest.raises(TransientRemoteError) as info:
        _create(p)
    assert info.value.maybe_created and "ReadTimeout" in info.value.message
