"""Error responses in vLLM's / OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or let FastAPI's validation fail); the exception handlers installed by
`install_error_handlers` turn everything into that body. Only bugs become 500s.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tokenpool.engine.async_engine import EngineDeadError

logger = logging.getLogger("tokenpool")

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    429: "TooManyRequestsError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered to the client with `status` and a clear `message`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"),
                                   "param": param, "code": status}})


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, param), status_code=status, media_type="application/json",
                    headers=headers)


def format_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """A short, readable message (and the offending field) from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"Malformed JSON body: {ctx.get('error', 'could not be parsed')}.", None
    # Union members each report an error for the same field; name the field once.
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = loc[0] if loc else None
    if field == "input" and len(errors) > 1:  # every member of the union failed
        return ("`input` must be a non-empty string, a non-empty list of non-empty strings, a non-empty list of "
                f"token ids (non-negative integers) or a non-empty list of such lists; got {_describe(first)}.",
                "input")
    if not loc and first.get("type") == "missing":
        return "The request body is empty: send a JSON object.", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        if isinstance(first.get("input"), (bytes, bytearray)):
            return "The request body must be a JSON object sent with `Content-Type: application/json`.", None
        return "The request body must be a JSON object.", None
    parts = []
    seen = set()
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        key = (where.split(".")[0], error.get("msg"))
        if key in seen:
            continue
        seen.add(key)
        parts.append(f"{where or 'body'}: {error.get('msg')}")
        if len(parts) == 3:
            break
    more = len(errors) - len(parts)
    suffix = f" (and {more} more)" if more > 0 and len(seen) >= 3 else ""
    return "Invalid request: " + "; ".join(parts) + suffix + ".", field


def _describe(error: dict) -> str:
    """What the client sent for the failing top-level field, in a few words."""
    value = error.get("input")
    if isinstance(value, list):
        return "an empty list" if not value else "a list with an invalid element"
    if value == "":
        return "an empty string"
    return {dict: "an object", bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = format_validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"Not Found: no route {request.method} {request.url.path}."
        if exc.status_code == 400 and "parsing the body" in message:
            message = "Malformed JSON body: it could not be decoded."
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> Response:
        return error_response(503, str(exc))

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return error_response(499, "Client disconnected.")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        logger.exception("Internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error: {type(exc).__name__}: {exc}")
