"""The HTTP routes: each parses its request (server/schemas.py) and hands it to the serving layer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import APIError, error_response
from server.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SessionCreateRequest,
                            SessionJoinRequest, TokenizeRequest)
from server.serving import Serving
from server.serving_sessions import SessionServing

router = APIRouter()


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _sessions(request: Request) -> SessionServing:
    return request.app.state.sessions


def _answer(result):
    """A serving method's result as the response: an APIError in the OpenAI error shape, anything else as is."""
    if isinstance(result, APIError):
        return error_response(result.status, result.message, result.kind, result.param)
    return result


@router.get("/health")
async def health(request: Request):
    return await _serving(request).health()


@router.get("/v1/fedattn/status")
async def status(request: Request):
    """What the engine(s) and the coordinator hold now, counts only."""
    return _answer(await _serving(request).status())


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_text(request: Request):
    return PlainTextResponse(generate_latest(_serving(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version(request: Request):
    return _serving(request).version()


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_serving(request).model_card()]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    return _answer(await _serving(request).model_named(model))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    return _answer(await _serving(request).tokenize(body))


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    return _answer(await _serving(request).detokenize(body))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return _answer(await _serving(request).completions(body, request))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return _answer(await _serving(request).chat_completions(body, request))


@router.post("/v1/fedattn/sessions")
async def create_session(body: SessionCreateRequest, request: Request):
    return _answer(await _sessions(request).create(body))


@router.get("/v1/fedattn/sessions")
async def list_sessions(request: Request):
    """Open sessions waiting for parts: ids, sizes, who joined; no tokens."""
    return _sessions(request).listing()


@router.delete("/v1/fedattn/sessions/{session_id}")
async def delete_session(session_id: str, request: Request):
    """The host ends an open session (header `X-FedAttn-Host-Token`); whoever joined gets an error."""
    return _answer(await _sessions(request).delete(session_id, request.headers.get("x-fedattn-host-token", "")))


@router.post("/v1/fedattn/sessions/{session_id}/participants/{participant}")
async def join_session(session_id: str, participant: int, body: SessionJoinRequest, request: Request):
    return _answer(await _sessions(request).join(session_id, participant, body, request))
