"""The OpenAI-compatible FastAPI app: completions and chat completions, single- or multi-party.

A single-party request is a one-participant FedAttn session (identical to plain vLLM). A
multi-party request carries `participants` (one segment each) and an optional `fedattn`
block; the response keeps the OpenAI shape and adds a `fedattn` usage block. Layered as
vLLM's entrypoints: request models (schemas.py), the serving layer (serving.py,
serving_sessions.py: what each endpoint does, errors as values), thin routes (routes.py);
this module wires them with the request gate, the error handlers and the OpenAPI schema.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.backend import Backend
from server.errors import install_error_handlers
from server.guard import RequestGuard
from server.metrics import CountRejections, Metrics
from server.openapi import install_openapi
from server.routes import router
from server.serving import Serving
from server.serving_sessions import SessionServing
from server.settings import ServerSettings


def build_app(settings: ServerSettings, backend: Backend | None = None) -> FastAPI:
    """The app; `backend` given (in-process tests): served at once and left open (close `app.state.serving`, then
    the backend), else started by the app's lifespan and closed with it. Its state is on `app.state`: `serving`,
    `sessions`."""
    metrics = backend.metrics if backend is not None else Metrics(settings.served_name)

    def serve(app: FastAPI, backend: Backend) -> None:
        app.state.serving = Serving(settings, backend, metrics)
        app.state.sessions = SessionServing(app.state.serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = None
        if backend is None:
            started = Backend.start(settings, metrics)
            serve(app, started)
        yield
        app.state.serving.close()
        if started is not None:
            started.close()

    app = FastAPI(title="fedattn-vllm", lifespan=lifespan)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(CountRejections, metrics=metrics)  # outermost: sees the guard's refusals too
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    install_error_handlers(app)
    app.include_router(router)
    install_openapi(app)
    if backend is not None:
        serve(app, backend)
    return app
