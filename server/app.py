"""The OpenAI-compatible FastAPI app: completions and chat completions, single- or multi-party.

A single-party request is a one-participant FedAttn session (identical to plain vLLM). A
multi-party request carries `participants` (one segment each) and an optional `fedattn`
block; the response keeps the OpenAI shape and adds a `fedattn` usage block.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as package_version

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError
from fedattn_vllm.federated.client import CoordinatorError
from fedattn_vllm.federated.party import PartyTask, terms_digest
from fedattn_vllm.session import FedAttnSession, FedAttnSessionError, SessionResult
from fedattn_vllm.prompting import chat_prefix, encode_part, encode_segments
from server.backend import SAMPLING_DEFAULTS, Backend
from server.errors import APIError, coordinator_error, error_body, install_error_handlers
from server.guard import RequestGuard
from server.invite import created
from server.issued import IssuedSessions
from server.logprobs import choice_logprobs
from server.openapi import install_openapi
from server.metrics import CountRejections, Metrics
from server.private import JoinError, PrivateSessions
from server.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, FedAttnBlock,
                            SessionCreateRequest, SessionJoinRequest, TokenizeRequest)
from server.settings import ServerSettings
from server.unsupported import refused_field, vllm_fields
from server.worker import EngineDead, QueueFull, Timings

log = logging.getLogger("server")


def create_app(settings: ServerSettings) -> FastAPI:
    state: dict = {}

    # Tokenizing and chat templating run here, off the event loop (one thread: tokenizers are not re-entrant).
    text_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedattn-tokenizer")

    async def off_loop(function, *args):
        return await asyncio.get_running_loop().run_in_executor(text_thread, function, *args)

    metrics = Metrics(settings.served_name)
    max_logprobs = settings.vllm_engine_args().get("max_logprobs", 20)  # vLLM's default

    def _sampling_of(body, max_tokens: int | None, *, chat: bool):
        backend = state["backend"]
        return _sampling(body, max_tokens, backend.sampling_defaults, len(backend.tokenizer), chat, max_logprobs)

    async def lifespan(app: FastAPI):
        backend = Backend.start(settings, metrics)
        import vllm

        for kind in ("completion", "chat"):  # vLLM's request fields, read once before serving
            vllm_fields(kind)
        state.update(backend=backend, metrics=metrics, vllm_version=vllm.__version__,
                     private=PrivateSessions(backend.worker.acquire, backend.worker.release),
                     issued=IssuedSessions(settings.max_sessions),
                     model=settings.served_name)
        metrics.waiting.set_function(lambda: backend.worker.queue_depth)
        metrics.running.set_function(lambda: backend.worker.running)
        if backend.tokenizer.chat_template is None:
            log.warning("%s has no chat template (a base model?): chat requests are refused; completions work, "
                        "and --chat-template supplies one", settings.served_name)
        yield
        backend.close()
        text_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fedattn-vllm", lifespan=lifespan)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(CountRejections, metrics=metrics)  # outermost: sees the guard's refusals too
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])

    install_error_handlers(app)
    install_openapi(app)

    @app.get("/health")
    async def health():
        problem = state["backend"].worker.health()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/fedattn/status")
    async def status():
        """What the engine(s) and the coordinator hold now, counts only: sessions, requests, credentials, K/V bytes
        at the coordinator, frames dropped (an operator's check that a failed session left nothing behind)."""
        try:  # EngineDead: a 503 (errors.py)
            holdings = await asyncio.wait_for(asyncio.wrap_future(state["backend"].worker.holdings()), 30)
        except TimeoutError:
            raise APIError(503, "the engine thread did not answer within 30 s", None, "server_error") from None
        return {"object": "fedattn.status", "health": state["backend"].worker.health() or "ok",
                "open_sessions": len(state["private"].sessions) + len(state["issued"]), **holdings}

    @app.get("/metrics")
    async def prometheus_text():
        return PlainTextResponse(generate_latest(state["metrics"].registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": package_version("fedattn-vllm"), "vllm": state["vllm_version"]}

    def _model_card() -> dict:
        return {"id": state["model"], "object": "model", "created": 0, "owned_by": "fedattn-vllm",
                "max_model_len": settings.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        _check_model(model)
        return _model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(body.model)
        tokenizer = state["backend"].tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = await off_loop(lambda: tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        else:
            _check_chat_template()
            ids = await off_loop(_chat_ids, tokenizer, [m.model_dump() for m in body.messages],
                                 body.add_generation_prompt)
        return {"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(body.model)
        tokenizer = state["backend"].tokenizer
        if not all(0 <= t < len(tokenizer) for t in body.tokens):
            raise APIError(400, f"tokens: token ids must be in the vocabulary (0..{len(tokenizer) - 1})", "tokens")
        return {"prompt": await off_loop(tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model)
        _check_host_role("prompt")
        if body.participants is not None and body.prompt in (None, ""):
            body.prompt = None  # SDKs that require `prompt` send "" beside participants
        if (body.prompt is None) == (body.participants is None):
            raise APIError(400, "give exactly one of prompt (single party) or participants (multi-party)", "prompt")
        if body.public_prefix is not None and body.participants is None:
            raise APIError(400, "public_prefix: only with participants (multi-party)", "public_prefix")
        parts = body.participants if body.participants is not None else [body.prompt]
        segments = [await _encode(p, f"participants[{i}]" if body.participants else "prompt")
                    for i, p in enumerate(parts)]
        prefix = await _encode_prefix(body.public_prefix)
        return await _run(request, body, prefix, segments, "text_completion", body.max_tokens or 16,
                          "participants" if body.participants else "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model)
        _check_host_role("messages")
        _check_chat_template()
        body.max_tokens = body.max_completion_tokens or body.max_tokens  # the newer name wins, as in vLLM
        tokenizer = state["backend"].tokenizer
        if not body.messages:
            body.messages = None  # SDKs that require `messages` send [] beside participants
        if (body.messages is None) == (body.participants is None):
            raise APIError(400, "give exactly one of messages (single party) or participants (multi-party)", "messages")
        if body.public_prefix is not None:
            raise APIError(400, "public_prefix: in chat the system message is the public prefix (use `system`)",
                           "public_prefix")
        if body.messages is not None:
            prefix, segments = [], [await off_loop(_chat_ids, tokenizer, [m.model_dump() for m in body.messages])]
        else:
            for i, part in enumerate(body.participants):
                if not part:
                    raise APIError(400, f"participants[{i}]: is empty", f"participants[{i}]")
            prefix, segments = await off_loop(lambda: encode_segments(tokenizer, body.participants, chat=True,
                                                                      system=body.system))
        return await _run(request, body, prefix, segments, "chat.completion", body.max_tokens,
                          "participants" if body.participants else "messages")

    async def _encode(segment, param: str) -> list[int]:
        """A segment's token ids: text tokenized (off the event loop), ids checked against the vocabulary."""
        tokenizer = state["backend"].tokenizer
        if isinstance(segment, str):
            ids = await off_loop(lambda: tokenizer(segment, add_special_tokens=False)["input_ids"])
        else:
            ids = segment
        if not ids:
            raise APIError(400, f"{param}: is empty", param)
        if not all(0 <= t < len(tokenizer) for t in ids):
            raise APIError(400, f"{param}: token ids must be in the vocabulary (0..{len(tokenizer) - 1})", param)
        return ids

    async def _encode_prefix(prefix) -> list[int]:
        """The public prefix's token ids ([] for none or empty)."""
        return await _encode(prefix, "public_prefix") if prefix not in (None, "", []) else []

    def _check_chat_template() -> None:
        if state["backend"].tokenizer.chat_template is None:
            raise APIError(400, f"{state['model']} has no chat template: use /v1/completions, or start the server "
                           "with --chat-template", "messages")

    def _check_host_role(param: str) -> None:
        if settings.role == "party":
            raise APIError(400, f"{param}: this server is one party's site (--role party): its engine runs only its "
                           "own part of sessions (create one with POST /v1/fedattn/sessions, join with the invitation)",
                           param)

    def _check_model(name: str) -> None:
        if name != state["model"]:
            raise APIError(404, f"model {name!r} is not served here (try {state['model']!r})", "model",
                           "not_found_error")

    async def _run(request: Request, body, prefix: list[int], segments: list[list[int]], kind: str,
                   max_tokens: int | None, prompt_param: str):
        if len(segments) > settings.max_participants:
            raise APIError(400, f"{len(segments)} participants exceed max_participants={settings.max_participants}",
                           "participants")
        config = _config(body.fedattn, single=len(segments) == 1)
        try:
            config.resolve(state["backend"].num_layers, len(segments))
        except FedAttnConfigError as error:
            raise APIError(400, str(error), f"fedattn.{error.field}") from None
        prompt_len = len(prefix) + sum(len(s) for s in segments)
        if prompt_len + (max_tokens or 1) > settings.max_model_len:
            # the one to change: max_tokens when it was asked for and the prompt alone fits
            param = "max_tokens" if body.max_tokens is not None and prompt_len < settings.max_model_len else prompt_param
            raise APIError(400, f"{param}: {prompt_len} prompt tokens + max_tokens="
                           f"{max_tokens} exceed max_model_len={settings.max_model_len}", param)
        sampling = _sampling_of(body, max_tokens, chat=kind != "text_completion")
        if settings.log_requests:
            log.info("request %s: %d participants, %s, public prefix %d", kind, len(segments),
                     [len(s) for s in segments], len(prefix))
        worker = state["backend"].worker
        stream = asyncio.Queue() if body.stream else None
        loop = asyncio.get_running_loop()

        def on_text(generator: int, text: str) -> None:
            loop.call_soon_threadsafe(stream.put_nowait, (generator, text))

        try:
            session_id, future, timings = worker.submit(FedAttnSession(segments, config, sampling, public_prefix=prefix),
                                                        on_text if stream else None)
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        response_id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        if stream is not None:
            generators = sorted(config.resolve(state["backend"].num_layers, len(segments)).generators)
            return StreamingResponse(_stream(worker, session_id, future, stream, response_id, kind,
                                             {g: i for i, g in enumerate(generators)}, _include_usage(body), timings,
                                             prompt_param),
                                     media_type="text/event-stream")
        try:
            result = await _unless_disconnected(request, asyncio.wrap_future(future))
        except (FedAttnConfigError, FedAttnSessionError) as error:
            raise _refusal(error, prompt_param) from None
        if result is None:
            worker.cancel(session_id)
            return JSONResponse({}, status_code=499)  # the client left
        if (failure := _failure(result, prompt_param)) is not None:
            raise failure
        return _response(result, timings, response_id, kind, body.logprob_count())

    async def _unless_disconnected(request: Request, awaitable):
        """The awaitable's result, or None if the client disconnects first."""
        task = asyncio.ensure_future(awaitable)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None

    def _chunk(response_id: str, kind: str, created: int, choices: list[dict], **extra) -> str:
        """One server-sent event of a streamed completion."""
        obj = kind if kind == "text_completion" else f"{kind}.chunk"
        body = {"id": response_id, "object": obj, "created": created, "model": state["model"], "choices": choices,
                **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def _stream(worker, session_id, future, stream: asyncio.Queue, response_id: str, kind: str,
                      index_of: dict[int, int], include_usage: bool, timings: Timings, segments_param: str):
        """Server-sent events: per choice (`index_of`: generator -> choice index) a role delta first (chat), its
        text as it comes, a last chunk with its finish reason and the session's `fedattn` block, then the usage
        (`stream_options.include_usage`); or the session's failure (`_failure`) as an error event."""
        created = int(time.time())

        def choice(g: int, text: str, finish_reason: str | None = None, role: bool = False) -> dict:
            if kind == "text_completion":
                content = {"text": text, "logprobs": None}
            else:
                content = {"delta": {"role": "assistant", "content": text} if role else {"content": text}}
            return {"index": index_of[g], "participant": g, **content, "finish_reason": finish_reason}

        try:
            if kind != "text_completion":
                yield _chunk(response_id, kind, created, [choice(g, "", role=True) for g in index_of])
            while not (future.done() and stream.empty()):
                try:
                    generator, text = await asyncio.wait_for(stream.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if text:
                    yield _chunk(response_id, kind, created, [choice(generator, text)])
            error = future.exception()
            if isinstance(error, (FedAttnConfigError, FedAttnSessionError)):
                failure = _refusal(error, segments_param)
            elif isinstance(error, CoordinatorError):
                failure = coordinator_error(error)
            elif error is not None:
                failure = APIError(500, str(error), None, "server_error")
            else:
                result = future.result()
                failure = _failure(result, segments_param)
            if failure is not None:
                body = error_body(failure.status, failure.message, failure.kind, failure.param)
                yield f"data: {json.dumps(body)}\n\n"
            else:
                yield _chunk(response_id, kind, created,
                             [choice(g, "", result.outputs[g].finish_reason) for g in index_of],
                             fedattn=_fedattn_block(result, timings))
                if include_usage:
                    yield _chunk(response_id, kind, created, [], usage=_usage(result))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:  # the client disconnected mid-stream
            worker.cancel(session_id)
            raise

    def _include_usage(body) -> bool:
        return body.stream_options is not None and body.stream_options.include_usage

    def _usage(result: SessionResult) -> dict:
        completion_tokens = sum(len(out.token_ids) for out in result.outputs.values())
        prompt_tokens = result.cost.prefix_tokens + sum(result.cost.tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _fedattn_block(result: SessionResult, timings: Timings) -> dict:
        return {
            "participants": len(result.cost.tokens), "tokens": result.cost.tokens,
            "public_prefix_tokens": result.cost.prefix_tokens,
            "sync_layers": list(result.cost.sync_layers),
            "published_bytes": result.cost.published_bytes, "received_bytes": result.cost.received_bytes,
            "timings": {"time_to_first_token_s": timings.first_token_s, "total_s": timings.total_s},
        }

    def _response(result: SessionResult, timings: Timings, response_id: str, kind: str,
                  top_logprobs: int | None = None) -> dict:
        """The reply; `top_logprobs`: the request asked for logprobs with that many alternatives per token."""
        choices = []
        decode = state["backend"].tokenizer.decode
        for i, (g, out) in enumerate(sorted(result.outputs.items())):
            logprobs = None
            if top_logprobs is not None and out.logprobs is not None:
                logprobs = choice_logprobs(out.token_ids, out.logprobs, top_logprobs, kind, lambda t: decode([t]))
            content = {"text": out.text} if kind == "text_completion" else \
                {"message": {"role": "assistant", "content": out.text}}
            choices.append({"index": i, "participant": g, **content, "logprobs": logprobs,
                            "finish_reason": out.finish_reason})
        return {"id": response_id, "object": kind, "created": int(time.time()), "model": state["model"],
                "choices": choices, "usage": _usage(result), "fedattn": _fedattn_block(result, timings)}

    @app.post("/v1/fedattn/sessions")
    async def create_session(body: SessionCreateRequest):
        _check_model(body.model)
        if body.participants > settings.max_participants:
            raise APIError(400, f"{body.participants} exceed max_participants={settings.max_participants}",
                           "participants")
        config = _config(body.fedattn, single=body.participants == 1)
        try:
            plan = config.resolve(state["backend"].num_layers, body.participants)
        except FedAttnConfigError as error:
            raise APIError(400, str(error), f"fedattn.{error.field}") from None
        if (broken := body.contradiction(party=settings.role == "party")) is not None:
            raise APIError(400, broken[1], broken[0])
        tokenizer = state["backend"].tokenizer
        if body.chat:
            _check_chat_template()
            prefix = await off_loop(chat_prefix, tokenizer, body.system)
        else:
            prefix = await _encode_prefix(body.public_prefix)
        sampling = _sampling_of(body, body.max_tokens, chat=body.chat)
        if settings.role == "party":
            return await _invite(body, config, plan)
        try:
            session = state["private"].create(body.participants, config, sampling, body.chat,
                                              body.join_timeout_s, prefix)
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        return {"id": session.session_id, "object": "fedattn.session", "generators": list(plan.generators),
                "join_timeout_s": body.join_timeout_s, "host_token": session.host_token,
                "participants": [{"index": n, "token": t} for n, t in enumerate(session.tokens)]}

    async def _invite(body: SessionCreateRequest, config: FedAttnConfig, plan) -> dict:
        """A session across party-side servers, opened at the coordinator with each participant bound to its
        site's key: the invitation every party's client hands its own server (with a fresh seal key)."""
        site = state["backend"].worker.cluster
        try:
            issued = await state["issued"].open(body.participants, body.join_timeout_s, lambda: asyncio.to_thread(
                site.open_session, [key.encode() for key in body.sites], config))
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        except FedAttnSessionError as error:
            raise APIError(403, str(error), None, "permission_error") from None
        except CoordinatorError as error:
            raise coordinator_error(error) from None
        return {**created(issued.session_id, body, plan), "host_token": issued.host_token}

    @app.get("/v1/fedattn/sessions")
    async def list_sessions():
        """Open sessions waiting for parts (a party server: those it opened at the coordinator): ids, sizes,
        who joined; no tokens."""
        listing = state["issued"].listing() if settings.role == "party" else state["private"].listing()
        return {"object": "list", "data": listing}

    @app.delete("/v1/fedattn/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        """The host ends an open session (header `X-FedAttn-Host-Token`); whoever joined gets an error."""
        host_token = request.headers.get("x-fedattn-host-token", "")
        try:
            if settings.role != "party":
                state["private"].delete(session_id, host_token)
            else:
                state["issued"].check(session_id, host_token)
                await asyncio.to_thread(state["backend"].worker.cluster.close_session, session_id)
                state["issued"].forget(session_id)
        except JoinError as error:
            raise APIError(error.status, str(error), error.param) from None
        except CoordinatorError as error:
            if error.code != "unknown_session":  # it is still open there: still listed, the host may try again
                raise coordinator_error(error) from None
            state["issued"].forget(session_id)  # it ended at the coordinator already
        return {"id": session_id, "object": "fedattn.session.deleted", "deleted": True}

    @app.post("/v1/fedattn/sessions/{session_id}/participants/{participant}")
    async def join_session(session_id: str, participant: int, body: SessionJoinRequest, request: Request):
        if settings.role == "party":
            return await _join_party(session_id, participant, body, request)
        if body.token is None or body.invitation is not None:
            raise APIError(400, "token: a private session is joined with its participant's token (invitations are for "
                           "party-side servers)", "token")
        private: PrivateSessions = state["private"]
        backend: Backend = state["backend"]
        try:
            session = private.get(session_id)
            session.check_token(participant, body.token)
        except JoinError as error:
            raise APIError(error.status, str(error), error.param) from None
        if isinstance(body.content, str):
            segment = await off_loop(lambda: encode_part(backend.tokenizer, body.content, participant, session.size,
                                                         chat=session.chat))
        else:
            segment = await _encode(body.content, "content")
        generators = session.config.resolve(backend.num_layers, session.size).generators
        if participant in generators and body.stream:
            session.streams[participant] = asyncio.Queue()
        session.parts[participant] = segment
        if len(session.parts) == session.size:
            _start_private(session)
        try:
            started = await _unless_disconnected(request, asyncio.shield(session.started))
        except JoinError as error:  # someone never joined, or left, or the host deleted the session
            raise APIError(error.status, str(error), None, error.kind) from None
        if started is None:  # this client left: the session ends for everyone
            if session.started.done() and session.started.exception() is None:
                state["backend"].worker.cancel(session.worker_session)
            else:
                private.fail(session_id, JoinError(409, f"participant {participant} disconnected before the session "
                                                   "started", None, "cancelled_error"))
            return JSONResponse({}, status_code=499)
        future, timings = started
        return await _participant_reply(request, body, session_id, participant, generators, session.worker_session,
                                        future, timings, session.streams.get(participant),
                                        "chat.completion" if session.chat else "text_completion")

    async def _participant_reply(request: Request, body: SessionJoinRequest, session_id: str, participant: int,
                                 generators, worker_session: str, future, timings: Timings, stream, kind: str):
        """A joined participant's answer: a generator's own choice (streamed if it asked), else a usage record."""
        response_id = f"fedsess-{uuid.uuid4().hex}"
        if stream is not None:  # its own answer, as choice 0
            return StreamingResponse(_stream(state["backend"].worker, worker_session, future, stream, response_id,
                                             kind, {participant: 0}, body.include_usage, timings, "content"),
                                     media_type="text/event-stream")
        try:
            result = await _unless_disconnected(request, asyncio.wrap_future(future))
        except (FedAttnConfigError, FedAttnSessionError) as error:  # e.g. the parts together do not fit
            raise _refusal(error, "content") from None
        if result is None:  # a participant that leaves ends the session for everyone
            state["backend"].worker.cancel(worker_session)
            return JSONResponse({}, status_code=499)
        if (failure := _failure(result, "content")) is not None:
            raise failure
        reply = _response(result, timings, response_id, kind)
        if participant not in generators:  # a usage record of its own part only
            usage = reply["fedattn"]
            own = {"participants": usage["participants"], "tokens": usage["tokens"][participant],
                   "public_prefix_tokens": usage["public_prefix_tokens"], "sync_layers": usage["sync_layers"],
                   "published_bytes": usage["published_bytes"][participant],
                   "received_bytes": usage["received_bytes"][participant]}
            return {"id": response_id, "object": "fedattn.participation", "session": session_id,
                    "participant": participant, "fedattn": own}
        reply["choices"] = [c for c in reply["choices"] if c["participant"] == participant]
        return reply

    async def _join_party(session_id: str, participant: int, body: SessionJoinRequest, request: Request):
        """This party's part, on this party's own engine, of a session opened at the coordinator (--role party)."""
        backend: Backend = state["backend"]
        site = backend.worker.cluster
        invitation = body.invitation
        if invitation is None:
            raise APIError(400, "invitation: a party-side server joins with the session's invitation (from the "
                           "server that created it)", "invitation")
        if invitation.session != session_id:
            raise APIError(400, f"invitation: made for session {invitation.session}", "invitation.session")
        terms = invitation.terms
        _check_model(terms.model)
        if (broken := terms.contradiction(party=True)) is not None:
            raise APIError(400, f"invitation.terms.{broken[1]}", f"invitation.terms.{broken[0]}")
        if not 0 <= participant < terms.participants:
            raise APIError(400, f"participant: {participant} is not in 0..{terms.participants - 1}", "participant")
        if terms.sites[participant].encode() != site.public_key:
            raise APIError(403, f"participant {participant} is bound to site {terms.sites[participant]}; this server "
                           f"is site {site.public_key.decode()}", "participant", "permission_error")
        try:
            seal_key = base64.b64decode(invitation.seal_key, validate=True)
        except ValueError:
            seal_key = b""
        if len(seal_key) != 32:
            raise APIError(400, "invitation.seal_key: 32 bytes in base64", "invitation.seal_key")
        config = _config(terms.fedattn, single=terms.participants == 1)
        try:
            plan = await asyncio.to_thread(site.describe, session_id, participant,
                                           sites=[key.encode() for key in terms.sites])
        except FedAttnSessionError as error:
            if error.field == "session":
                raise APIError(404, str(error), "session", "not_found_error") from None
            raise APIError(409, str(error), f"invitation.terms.{error.field}", "conflict_error") from None
        if plan.config.to_dict() != config.to_dict() or plan.num_participants != terms.participants:
            raise APIError(409, "invitation: its settings differ from the session's at the coordinator", "invitation")
        if terms.chat:
            _check_chat_template()
            prefix = await off_loop(chat_prefix, backend.tokenizer, terms.system)
        else:
            prefix = await _encode_prefix(terms.public_prefix)
        if isinstance(body.content, str):
            segment = await off_loop(lambda: encode_part(backend.tokenizer, body.content, participant,
                                                         terms.participants, chat=terms.chat))
        else:
            segment = await _encode(body.content, "content")
        sampling = _sampling_of(terms, terms.max_tokens, chat=terms.chat)
        digest = terms_digest(session=session_id, terms=terms.model_dump(mode="json"),
                              seal_key=hashlib.sha256(seal_key).digest())
        task = PartyTask(session_id, participant, plan, segment, prefix, sampling, seal_key, digest,
                         terms.join_timeout_s)
        stream = asyncio.Queue() if participant in plan.generators and body.stream else None
        loop = asyncio.get_running_loop()

        def on_text(generator: int, text: str) -> None:
            loop.call_soon_threadsafe(stream.put_nowait, (generator, text))

        try:
            worker_session, future, timings = backend.worker.submit(task, on_text if stream else None)
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        except EngineDead as error:
            raise APIError(503, f"the engine is down: {error}", None, "server_error") from None
        return await _participant_reply(request, body, session_id, participant, plan.generators, worker_session,
                                        future, timings, stream, "chat.completion" if terms.chat else "text_completion")

    def _start_private(session) -> None:
        """All parts are in: run the session; generators that stream get their pieces."""
        state["private"].close_joins(session.session_id)
        segments = [session.parts[n] for n in range(session.size)]
        fedattn_session = FedAttnSession(segments, session.config, session.sampling, public_prefix=session.prefix)
        loop = asyncio.get_running_loop()

        def on_text(generator: int, text: str) -> None:
            if generator in session.streams:
                loop.call_soon_threadsafe(session.streams[generator].put_nowait, (generator, text))

        try:
            worker_session, future, timings = state["backend"].worker.submit(fedattn_session, on_text, held=True)
        except EngineDead as error:
            session.started.set_exception(JoinError(503, f"the engine is down: {error}", None, "server_error"))
            return
        session.worker_session = worker_session
        session.started.set_result((future, timings))

    return app


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _sampling(body, max_tokens: int | None, defaults: dict, vocab: int, chat: bool, max_logprobs: int):
    """vLLM's SamplingParams of the request: its own values, else the model's generation_config (`defaults`),
    else OpenAI's; a field of vLLM's requests (chat or completion) this server does not do, a token id outside
    the vocabulary, or what vLLM refuses is a 400."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    if (name := refused_field(body, "chat" if chat else "completion")) is not None:
        raise APIError(400, f"{name}: not supported by this server (a field of vLLM's OpenAI server that FedAttn "
                       "sessions do not implement; README: compatibility)", name)
    if (name := body.token_ids_outside(vocab)) is not None:
        raise APIError(400, f"{name}: token ids must be in the vocabulary (0..{vocab - 1})", name)
    if body.logprob_count() is not None and body.stream:
        raise APIError(400, "logprobs: not with stream yet (ask without streaming)", "logprobs")
    if body.logprob_count() is not None and body.logprob_count() > max_logprobs:
        raise APIError(400, f"logprobs: at most {max_logprobs} alternatives per token (the engine's max_logprobs)",
                       "top_logprobs" if chat else "logprobs")
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens: {body.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
    chosen = {name: value if (value := getattr(body, name)) is not None else defaults.get(name, default)
              for name, default in SAMPLING_DEFAULTS.items()}
    try:
        return SamplingParams(max_tokens=max_tokens, seed=body.seed, stop=body.stop,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                              stop_token_ids=body.stop_token_ids, include_stop_str_in_output=body.include_stop_str_in_output,
                              skip_special_tokens=body.skip_special_tokens,
                              spaces_between_special_tokens=body.spaces_between_special_tokens,
                              logit_bias=body.logit_bias and {int(k): v for k, v in body.logit_bias.items()},
                              allowed_token_ids=body.allowed_token_ids, bad_words=body.bad_words or None,
                              logprobs=body.logprob_count(), **chosen)
    except (ValueError, VLLMValidationError) as error:
        raise APIError(400, f"sampling parameters: {error}", getattr(error, "parameter", None)) from None


def _refusal(error: FedAttnConfigError | FedAttnSessionError, segments_param: str) -> APIError:
    """A session the worker refused before it ran: a 400 naming the field (`segments_param` for a part)."""
    if isinstance(error, FedAttnConfigError):
        return APIError(400, str(error), f"fedattn.{error.field}")
    param = segments_param if error.field == "segments" else error.field
    return APIError(400, f"{param}: {str(error).split(': ', 1)[-1]}", param)


def _failure(result: SessionResult, segments_param: str) -> APIError | None:
    """What a failed session answers (None: it did not fail): a participant that left is a cancellation (409),
    sites that joined with different invitations a conflict (409), an input an engine refused a 400 naming it
    (`segments_param` for a part), anything else a 500."""
    if result.error is None:
        return None
    if result.error == "cancelled":
        return APIError(409, "session ended: a participant disconnected", None, "cancelled_error")
    if result.error_field == "invitation":
        return APIError(409, f"session ended: {result.error}", "invitation", "conflict_error")
    if result.error_field:
        return APIError(400, result.error, segments_param if result.error_field == "segments" else result.error_field)
    return APIError(500, result.error, None, "server_error")


def _config(block: FedAttnBlock | None, single: bool) -> FedAttnConfig:
    """The session's config; a single party is plain inference (nothing to share with anyone)."""
    try:
        config = (block or FedAttnBlock()).to_config()
    except FedAttnConfigError as error:
        raise APIError(400, str(error), f"fedattn.{error.field}") from None
    return FedAttnConfig(placement="explicit", sync_layers=()) if single else config

