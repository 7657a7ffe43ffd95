"""The OpenAPI schema as the server answers: every error status a route can return, in the OpenAI error shape.

FastAPI declares 422 for every route with a body; this server answers validation errors with
400 (errors.py), so 422 is dropped and each operation lists the statuses it really returns.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.guard import PROTECTED

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "code": {"type": "integer", "description": "the HTTP status, as in vLLM's server"}}}},
}
REASONS = {400: "Bad request (the field is named in `param`)", 401: "API key missing or wrong",
           403: "Not this participant's, host's or site's to do", 404: "Unknown model, session or participant",
           408: "A participant did not join in time", 409: "The session's state or terms conflict",
           413: "Body over --max-body-bytes", 429: "Too many sessions (--max-sessions)",
           500: "Internal error, or the session failed", 502: "The coordinator refused or did not answer",
           503: "The engine or the coordinator is down or busy"}


HEALTH_SCHEMA = {"type": "object", "properties": {"status": {"type": "string"}, "error": {"type": "string"}}}


def error_statuses(path: str, method: str) -> set[int]:
    """The error statuses (OpenAI shape) an operation can answer with; /health's 503 has a shape of its own."""
    if not path.startswith(PROTECTED):  # health, metrics, version: no key, no body
        return {500}
    statuses = {400, 401, 413, 500, 503}
    if path.startswith("/v1/fedattn/sessions"):
        return statuses | {403, 404, 408, 409, 429, 502}
    if method == "post" and path.startswith("/v1/"):
        return statuses | {404, 429, 502}
    return statuses | {404}


def install_openapi(app: FastAPI) -> None:
    def schema() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in document["paths"].items():
                for method, operation in operations.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status in sorted(error_statuses(path, method)):
                        responses[str(status)] = {"description": REASONS[status],
                                                  "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            document["paths"]["/health"]["get"]["responses"]["503"] = {
                "description": "The engine cannot take sessions now (`error` says why)",
                "content": {"application/json": {"schema": HEALTH_SCHEMA}}}
            for name in ("HTTPValidationError", "ValidationError"):
                document.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = schema
