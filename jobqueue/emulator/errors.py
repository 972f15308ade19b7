"""API errors in the remote's documented shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An HTTP error answer: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"No such {kind}: '{ident}'", param="id", code=None)


def invalid_value(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def missing_param(param: str) -> ApiError:
    return ApiError(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def server_error() -> ApiError:
    return ApiError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


def rate_limited(retry_after: float) -> ApiError:
    return ApiError(
        429,
        "Rate limit reached for requests. Please try again later.",
        type="requests",
        code="rate_limit_exceeded",
        headers={
            "retry-after": str(max(0, round(retry_after))),
            "retry-after-ms": str(max(0, round(retry_after * 1000))),
        },
    )
