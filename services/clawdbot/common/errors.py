"""One error type for the whole mesh, rendered in OpenAI's error shape.

Every failure a client can see is a GatewayError: it knows its HTTP status, its OpenAI
`type` and `code`, and how to travel between services (gRPC status + a trailing-metadata
copy of itself), so that the adapter can answer in the right shape on every protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, cast

import grpc
import orjson
from redis.exceptions import RedisError

# Trailing metadata key that carries the error across a gRPC hop (-bin: raw bytes).
ERROR_METADATA_KEY = "clawdbot-error-bin"

_GRPC_CODE_BY_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_STATUS_BY_GRPC_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class GatewayError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: str | None = None
    # Response headers the answer carries beside Retry-After (a 429's x-ratelimit-*),
    # on every protocol that has headers.
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        super().__init__(self.message)

    # --- constructors for the common cases, so messages stay consistent -------------

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> GatewayError:
        return cls(400, message, "invalid_request_error", code, param)

    @classmethod
    def unauthorized(cls, message: str) -> GatewayError:
        return cls(401, message, "invalid_request_error", "invalid_api_key")

    @classmethod
    def model_not_found(cls, model: str) -> GatewayError:
        return cls(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    @classmethod
    def model_not_allowed(cls, model: str) -> GatewayError:
        # 403 as OpenAI answers a project key that may not use a model; OpenAI's SDKs raise
        # PermissionDeniedError for it whatever the type, and the code says why.
        return cls(
            403,
            f"This API key is not allowed to use the model `{model}`.",
            "permission_error",
            "model_not_allowed",
            "model",
        )

    @classmethod
    def unavailable(cls, message: str, code: str = "service_unavailable") -> GatewayError:
        return cls(503, message, "service_unavailable", code)

    # --- renderings ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def grpc_code(self) -> grpc.StatusCode:
        if self.status >= 500 and self.status not in _GRPC_CODE_BY_STATUS:
            return grpc.StatusCode.INTERNAL
        return _GRPC_CODE_BY_STATUS.get(self.status, grpc.StatusCode.UNKNOWN)

    def to_metadata_value(self) -> bytes:
        return orjson.dumps(
            {
                "status": self.status,
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
                "retry_after": self.retry_after,
                "headers": self.headers,
            }
        )

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ((ERROR_METADATA_KEY, self.to_metadata_value()),)

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        """End the gRPC call being served with this error (raises, as context.abort does)."""
        await context.abort(self.grpc_code(), self.message, trailing_metadata=self.trailing_metadata())

    @classmethod
    def from_rpc_error(cls, err: grpc.aio.AioRpcError, peer: str) -> GatewayError:
        """Rebuild the error a downstream service raised, or describe a transport failure."""
        trailing = cast("Iterable[tuple[str, str | bytes]]", err.trailing_metadata() or ())
        for key, value in trailing:
            if key == ERROR_METADATA_KEY and isinstance(value, bytes):
                data = orjson.loads(value)
                return cls(
                    int(data["status"]),
                    str(data["message"]),
                    str(data["type"]),
                    data.get("code"),
                    data.get("param"),
                    data.get("retry_after"),
                    tuple((str(k), str(v)) for k, v in data.get("headers") or ()),
                )
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return cls.unavailable(f"The {peer} service is unavailable; try again shortly.")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return cls(504, f"The {peer} service did not answer in time.", "timeout", "timeout")
        if code == grpc.StatusCode.CANCELLED:
            return cls(499, "The request was cancelled.", "invalid_request_error", "cancelled")
        status = _STATUS_BY_GRPC_CODE.get(code, 500)
        return cls(status, f"{peer} failed: {err.details() or code.name}", "server_error", "internal_error")


def internal_error() -> GatewayError:
    """What a client sees for a bug: no traceback, just an apology and the request id in logs."""
    return GatewayError(500, "The gateway hit an internal error; it has been logged.", "server_error", "internal_error")


@contextlib.asynccontextmanager
async def redis_available(what: str, code: str) -> AsyncIterator[None]:
    """Redis trouble while using `what` is a 503 that says so, never a traceback."""
    try:
        yield
    except RedisError as exc:
        raise GatewayError.unavailable(
            f"The {what} is unavailable ({type(exc).__name__}); try again shortly.", code=code
        ) from exc
