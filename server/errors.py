"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`, for every status, 500s included."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.exceptions import VLLMValidationError

from fedattn_vllm.federated.client import CoordinatorError
from server.worker import EngineDead

log = logging.getLogger("server")


def error_body(status: int, message: str, kind: str, param: str | None) -> dict:
    """The OpenAI error shape, `code` the HTTP status as in vLLM's server."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)


class APIError(Exception):
    """An error returned in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def coordinator_error(error: CoordinatorError) -> APIError:
    """The coordinator refused or did not answer: 503 when it is full (`busy`), else 502."""
    if error.code == "busy":
        return APIError(503, f"the coordinator is busy: {error}", None, "server_error")
    return APIError(502, f"the coordinator: {error}", None, "server_error")


# Names pydantic gives the members of a union in an error location (not fields of the request).
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
_UNION_TAG_PREFIXES = ("function-", "lax-or-strict", "json-or-python", "constrained-")


def param_name(loc: tuple) -> str | None:
    """A validation error's location as the request names it: `participants[1]`, `fedattn.seed`.

    Pydantic adds the member of a union it tried (`str`, `list[int]`, `function-after[...]`); those are dropped.
    """
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not (part in _UNION_TAGS or "[" in part or part.startswith(_UNION_TAG_PREFIXES)):
            name += f".{part}" if name else part
    return name or None


def allowed_methods(request: Request) -> list[str]:
    """The methods the request's path answers, over every route that matches it."""
    from starlette.routing import Match

    methods = set()
    for route in request.app.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises, or FastAPI and Starlette raise for it, answered in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError):
        return error_response(error.status, error.message, error.kind, error.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError):
        first = max(error.errors(), key=lambda e: len(e["loc"]))  # of a union's members, the one that got furthest
        param = param_name(tuple(first["loc"]))
        if first["type"] == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(VLLMValidationError)
    async def vllm_validation_error(_: Request, error: VLLMValidationError):  # raised by vLLM's request validators
        message = f"{error.parameter}: {error.args[0]}" if error.parameter else error.args[0]
        return error_response(400, message, "invalid_request_error", error.parameter)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # unknown routes, methods, bad bodies
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        headers = getattr(error, "headers", None)
        if error.status_code == 405:  # every method the path has (Starlette names only the first route's)
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(error.status_code, str(error.detail), kind, headers=headers)

    @app.exception_handler(EngineDead)
    async def engine_dead(_: Request, error: EngineDead):
        return error_response(503, f"the engine is down: {error}", "server_error")

    @app.exception_handler(CoordinatorError)
    async def coordinator_refused(_: Request, error: CoordinatorError):
        failure = coordinator_error(error)
        return error_response(failure.status, failure.message, failure.kind)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal server error ({type(error).__name__})", "server_error")
