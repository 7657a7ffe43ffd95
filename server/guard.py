"""The server's gate, as pure ASGI middleware: the API key on /v1 routes and a cap on request bodies.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that the app's `receive` stays the
server's own: a handler's `request.is_disconnected()` sees a client that left.
"""

from __future__ import annotations

import json
import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body


class RequestGuard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected is not None and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                return await _reply(send, 401, error_body("a valid API key is required (Authorization: Bearer ...)",
                                                          "authentication_error", None, "invalid_api_key"))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _reply(send, 400, error_body("Content-Length is not a number", "invalid_request_error", None))
        if declared is not None and int(declared) > self.max_body_bytes:
            return await _reply(send, 413, self._too_large())
        received = 0

        async def capped_receive() -> Message:  # a body without Content-Length is counted as it arrives
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large()["error"]["message"])
            return message

        await self.app(scope, capped_receive, send)

    def _too_large(self) -> dict:
        return error_body(f"the request body exceeds {self.max_body_bytes} bytes", "invalid_request_error", None,
                          "request_too_large")


async def _reply(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
