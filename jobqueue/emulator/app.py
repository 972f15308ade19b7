"""The Starlette app: the remote's Files and Batches routes, and the `/_emulator/` control API.

Everything that happens before a route runs (counting, faults, auth, `x-request-id`) lives in
`EmulatorApp.__call__`, outside Starlette's middleware, because dropping a connection needs
the server's raw `send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from jobqueue.emulator.config import EmulatorConfig
from jobqueue.emulator.engine import FILE_PURPOSES, Emulator, check_expires_after
from jobqueue.emulator.errors import ApiError, invalid_value, missing_param, rate_limited
from jobqueue.emulator.errors import server_error as server_error_answer
from jobqueue.emulator.faults import drop_connection

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

PREFIXES = ("/openai/v1", "/v1")  # Azure's path, then OpenAI's
DOWNLOAD_CHUNK = 1 << 20
MAX_FORM_FIELD = 64 * 1024


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: ApiError) -> Response:
    return OrjsonResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def classify(method: str, path: str) -> tuple[str, str | None] | None:
    """(route template, batch id or None) of a remote API call, or None for other paths."""
    for prefix in PREFIXES:
        if path.startswith(prefix + "/"):
            rest = path[len(prefix) :].rstrip("/")
            break
    else:
        return None
    parts = rest.split("/")[1:]
    if not parts or parts[0] not in ("files", "batches"):
        return f"{method} (unknown)", None
    kind = parts[0]
    if len(parts) == 1:
        return f"{method} /v1/{kind}", None
    ident = parts[1]
    tail = "/" + "/".join(parts[2:]) if len(parts) > 2 else ""
    return f"{method} /v1/{kind}/{{id}}{tail}", ident if kind == "batches" else None


class EmulatorApp(Starlette):
    emulator: Emulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(16)
        raw_send = send
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await raw_send(message)

        scope["emulator.raw_send"] = raw_send
        route = classify(scope["method"], scope["path"])
        if route is not None:
            answer = await self._before_route(scope, route, raw_send)
            if answer is not None:
                await answer(scope, receive, send_with_id)
                return
            if scope.get("emulator.dropped"):
                return
        await super().__call__(scope, receive, send_with_id)

    async def _before_route(
        self, scope: Scope, route: tuple[str, str | None], raw_send: Send
    ) -> Response | None:
        """Count the call, then inject faults and check the key; an answer ends the call."""
        emulator = self.emulator
        template, batch_id = route
        emulator.count_call(template)
        fault, cut = emulator.faults.draw(download=template.endswith("/content"))
        settings = emulator.faults.settings
        if fault == "500":
            return error_response(server_error_answer())
        if fault == "429":
            return error_response(rate_limited(settings["retry_after_seconds"]))
        if fault == "drop":
            await drop_connection(raw_send)
            scope["emulator.dropped"] = True
            return None
        if fault == "slow":
            await asyncio.sleep(settings["slow_seconds"])
        if batch_id is not None and emulator.take_call_fault(batch_id):
            return error_response(server_error_answer())
        scope["emulator.cut"] = cut
        return check_auth(scope, emulator.config.api_key)


def check_auth(scope: Scope, api_key: str | None) -> Response | None:
    headers = dict(scope["headers"])
    given: str | None = None
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    elif b"api-key" in headers:
        given = headers[b"api-key"].decode("latin-1").strip()
    if not given:
        return error_response(
            ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        )
    if api_key is not None and given != api_key:
        shown = given[:3] + "*" * 4 + given[-4:] if len(given) > 8 else "****"
        return error_response(
            ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        )
    return None


def _emulator(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


async def _json(request: Request) -> Any:
    body = await request.body()
    if not body:
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
        ) from None


# ----------------------------------------------------------------------- files


class _Upload:
    """Streaming multipart parsing: the file part goes straight to disk, fields to memory."""

    def __init__(self, target: Path, max_bytes: int) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self._out: Any = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._value = bytearray()
        self._is_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._value = bytearray()
        self._is_file = False

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode()
        if b"filename" in options and self._name == "file":
            self._is_file = True
            self.filename = options[b"filename"].decode()
            self._out = open(self.target, "wb")  # noqa: SIM115 - closed in _part_end/close

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise ApiError(
                    413,
                    f"The file is too large: the limit is {self.max_bytes} bytes.",
                    param="file",
                    code="file_too_large",
                )
            self._out.write(data[start:end])
        else:
            self._value.extend(data[start:end])
            if len(self._value) > MAX_FORM_FIELD:
                raise invalid_value(self._name, f"The field '{self._name}' is too long.")

    def _part_end(self) -> None:
        if self._is_file:
            self._out.close()
            self._out = None
        else:
            self.fields[self._name] = self._value.decode()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def upload_file(request: Request) -> Response:
    emulator = _emulator(request)
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(400, "The request must be multipart/form-data with a 'file' part.")
    target = emulator.upload_path()
    upload = _Upload(target, emulator.config.max_upload_bytes)
    parser = MultipartParser(options[b"boundary"], upload.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        upload.close()
        if upload.filename is None:
            raise missing_param("file")
        purpose = upload.fields.get("purpose")
        if not purpose:
            raise missing_param("purpose")
        if purpose not in FILE_PURPOSES:
            raise invalid_value(
                "purpose",
                f"Invalid value for 'purpose': '{purpose}'. Supported values are: "
                + ", ".join(f"'{p}'" for p in sorted(FILE_PURPOSES))
                + ".",
            )
        if purpose == "batch" and not upload.filename.endswith(".jsonl"):
            raise invalid_value("file", "Invalid file format for Batch API. Must be .jsonl")
        expires = None
        anchor = upload.fields.get("expires_after[anchor]")
        seconds = upload.fields.get("expires_after[seconds]")
        if anchor is not None or seconds is not None:
            expires = check_expires_after({"anchor": anchor, "seconds": seconds}, "expires_after")
        record = emulator.add_file(
            target,
            filename=upload.filename,
            purpose=purpose,
            size=upload.size,
            expires_after_seconds=expires,
        )
    finally:
        upload.close()
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    return OrjsonResponse(record)


async def list_files(request: Request) -> Response:
    q = request.query_params
    return OrjsonResponse(
        _emulator(request).list_files(
            purpose=q.get("purpose") or None,
            limit=_int_param(q.get("limit"), "limit", 10000),
            order=q.get("order") or "desc",
            after=q.get("after") or None,
        )
    )


async def get_file(request: Request) -> Response:
    return OrjsonResponse(_emulator(request).get_file(request.path_params["file_id"]))


async def delete_file(request: Request) -> Response:
    return OrjsonResponse(_emulator(request).delete_file(request.path_params["file_id"]))


class FileBody(Response):
    """Streams a file from disk with its full Content-Length; may be told to stop early."""

    def __init__(self, path: Path, size: int, cut: bool) -> None:
        self.path = path
        self.size = size
        self.cut = cut and size > 1
        self.status_code = 200
        self.background = None
        self.init_headers({"content-type": "application/octet-stream", "content-length": str(size)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Opened before the answer starts so that a file deleted meanwhile is still whole.
        f = open(self.path, "rb")  # noqa: SIM115 - closed below
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            limit = self.size // 2 if self.cut else self.size
            sent = 0
            while sent < limit:
                data = f.read(min(DOWNLOAD_CHUNK, limit - sent))
                if not data:
                    break
                sent += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if self.cut:
                await drop_connection(scope["emulator.raw_send"])
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            f.close()


async def file_content(request: Request) -> Response:
    path, size, _name = _emulator(request).file_content(request.path_params["file_id"])
    return FileBody(path, size, bool(request.scope.get("emulator.cut")))


# ----------------------------------------------------------------------- batches


async def create_batch(request: Request) -> Response:
    emulator = _emulator(request)
    batch, fault = emulator.create_batch(await _json(request))
    if fault == "500":
        return error_response(server_error_answer())
    if fault == "429":
        return error_response(rate_limited(emulator.faults.settings["retry_after_seconds"]))
    if fault == "drop":
        await drop_connection(request.scope["emulator.raw_send"])
        return _Nothing()
    return OrjsonResponse(batch)


class _Nothing(Response):
    """No answer at all: the connection is gone already."""

    def __init__(self) -> None:
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


async def get_batch(request: Request) -> Response:
    return OrjsonResponse(_emulator(request).get_batch(request.path_params["batch_id"]))


async def cancel_batch(request: Request) -> Response:
    return OrjsonResponse(_emulator(request).cancel_batch(request.path_params["batch_id"]))


async def list_batches(request: Request) -> Response:
    q = request.query_params
    return OrjsonResponse(
        _emulator(request).list_batches(
            after=q.get("after") or None, limit=_int_param(q.get("limit"), "limit", 20)
        )
    )


def _int_param(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise invalid_value(name, f"'{name}' must be an integer.") from None


# ----------------------------------------------------------------------- control API


async def control_script(request: Request) -> Response:
    actions = await _control_json(request)
    return OrjsonResponse(_emulator(request).script(request.path_params["batch_id"], **actions))


async def control_script_next(request: Request) -> Response:
    actions = await _control_json(request)
    match = actions.pop("match_metadata", None)
    times = int(actions.pop("times", 1))
    _emulator(request).script_next(match, times=times, **actions)
    return OrjsonResponse({"ok": True})


async def control_faults(request: Request) -> Response:
    return OrjsonResponse(_emulator(request).set_faults(**await _control_json(request)))


async def control_advance(request: Request) -> Response:
    body = await _control_json(request)
    seconds = float(body.get("seconds", 0))
    emulator = _emulator(request)
    await run_in_threadpool(emulator.advance, seconds)  # it may wait for output files
    return OrjsonResponse({"now": emulator.now()})


async def control_stats(request: Request) -> Response:
    return OrjsonResponse(_emulator(request).stats())


async def control_batches(request: Request) -> Response:
    return OrjsonResponse({"object": "list", "data": _emulator(request).batches()})


async def _control_json(request: Request) -> dict[str, Any]:
    body = await _json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "The control API takes a JSON object.")
    return body


# ----------------------------------------------------------------------- assembly


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _value_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(400, str(exc)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(server_error_answer())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    else:
        message = f"{exc.detail} ({request.method} {request.url.path})"
    return error_response(ApiError(exc.status_code, message))


def _routes() -> list[Route]:
    routes: list[Route] = []
    for prefix in PREFIXES:
        routes += [
            Route(f"{prefix}/files", upload_file, methods=["POST"]),
            Route(f"{prefix}/files", list_files, methods=["GET"]),
            Route(f"{prefix}/files/{{file_id}}", get_file, methods=["GET"]),
            Route(f"{prefix}/files/{{file_id}}", delete_file, methods=["DELETE"]),
            Route(f"{prefix}/files/{{file_id}}/content", file_content, methods=["GET"]),
            Route(f"{prefix}/batches", create_batch, methods=["POST"]),
            Route(f"{prefix}/batches", list_batches, methods=["GET"]),
            Route(f"{prefix}/batches/{{batch_id}}", get_batch, methods=["GET"]),
            Route(f"{prefix}/batches/{{batch_id}}/cancel", cancel_batch, methods=["POST"]),
        ]
    routes += [
        Route("/_emulator/batches/{batch_id}/script", control_script, methods=["POST"]),
        Route("/_emulator/script-next", control_script_next, methods=["POST"]),
        Route("/_emulator/faults", control_faults, methods=["POST"]),
        Route("/_emulator/clock/advance", control_advance, methods=["POST"]),
        Route("/_emulator/stats", control_stats, methods=["GET"]),
        Route("/_emulator/batches", control_batches, methods=["GET"]),
    ]
    return routes


def create_app(config_or_emulator: EmulatorConfig | Emulator | None = None) -> EmulatorApp:
    """The ASGI app; `app.state.emulator` is its engine.

    Given a config, the app owns the engine it makes and closes it at lifespan shutdown.
    """
    if isinstance(config_or_emulator, Emulator):
        emulator, owned = config_or_emulator, False
    else:
        emulator, owned = Emulator(config_or_emulator or EmulatorConfig()), True

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            emulator.close()

    app = EmulatorApp(
        routes=_routes(),
        exception_handlers={
            ApiError: _api_error,
            ValueError: _value_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.emulator = emulator
    app.state.emulator = emulator
    return app
