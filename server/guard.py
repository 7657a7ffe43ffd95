"""The server's gate, as pure ASGI middleware: the API key on /v1 routes and /tokenize, /detokenize, and a cap on
request bodies.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that the app's `receive` stays the
server's own: a handler's `request.is_disconnected()` sees a client that left.
"""

from __future__ import annotations

import json
import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body


PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # routes that need the API key (health, metrics, version do not)

class RequestGuard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.too_large = f"the request body exceeds {max_body_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith(PROTECTED):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                return await _reply(send, 401, "a valid API key is required (Authorization: Bearer ...)",
                                    "authentication_error")
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _reply(send, 400, "Content-Length is not a number", "invalid_request_error")
        if declared is not None and int(declared) > self.max_body_bytes:
            return await _reply(send, 413, self.too_large, "invalid_request_error")
        received = 0

        async def capped_receive() -> Message:  # a body without Content-Length is counted as it arrives
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self.too_large)  # errors.py answers it in the OpenAI shape
            return message

        await self.app(scope, capped_receive, send)


async def _reply(send: Send, status: int, message: str, kind: str) -> None:
    """An error in the OpenAI shape, sent before the app sees the request."""
    payload = json.dumps(error_body(status, message, kind, None)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
