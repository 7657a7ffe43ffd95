"""The serving layer: what each OpenAI endpoint does, on one backend, with errors returned as values.

`Serving` holds what the endpoints share (the backend, metrics, open sessions, the tokenizer's
thread) and implements completions, chat completions, tokenize/detokenize, model cards, health
and status; `server.serving_sessions` the private and party-side sessions on top of it. A public
method returns its answer or the `APIError` it fails with (as vLLM's serving classes return an
ErrorResponse); the routers (server/routes.py) turn either into a response.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as package_version

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from fedattn_vllm.config import FedAttnConfigError
from fedattn_vllm.prompting import encode_segments
from fedattn_vllm.session import FedAttnSession, FedAttnSessionError, Piece
from server.backend import Backend
from server.errors import APIError
from server.issued import IssuedSessions
from server.metrics import Metrics
from server.private import PrivateSessions
from server.responses import StreamUsage, reply, stream_events
from server.sampling import chat_ids, failure, refusal, sampling_params, session_config
from server.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SessionCreateRequest,
                            TokenizeRequest)
from server.settings import ServerSettings
from server.unsupported import inherited_defaults
from server.worker import QueueFull

log = logging.getLogger("server")
DISCONNECT_POLL_S = 0.1  # how often a request waiting on its session looks for a client that left


def errors_as_values(method):
    """The endpoint returns the APIError it raised instead of raising it."""
    @functools.wraps(method)
    async def endpoint(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except APIError as error:
            return error
    return endpoint


class Serving:
    def __init__(self, settings: ServerSettings, backend: Backend, metrics: Metrics):
        import vllm

        self.settings, self.backend, self.metrics = settings, backend, metrics
        self.model = settings.served_name
        self.vllm_version = vllm.__version__
        self.max_logprobs = settings.vllm_engine_args().get("max_logprobs", 20)  # vLLM's default
        self.private = PrivateSessions(backend.worker.acquire, backend.worker.release)
        self.issued = IssuedSessions(settings.max_sessions)
        # Tokenizing and chat templating run here, off the event loop (one thread: tokenizers are not re-entrant).
        self._text_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedattn-tokenizer")
        for request_class in (CompletionRequest, ChatCompletionRequest, SessionCreateRequest):
            inherited_defaults(request_class)  # vLLM's fields that are not ours, read once before serving
        metrics.waiting.set_function(lambda: backend.worker.queue_depth)
        metrics.running.set_function(lambda: backend.worker.running)
        if backend.tokenizer.chat_template is None:
            log.warning("%s has no chat template (a base model?): chat requests are refused; completions work, "
                        "and --chat-template supplies one", self.model)

    def close(self) -> None:
        self._text_thread.shutdown(wait=False, cancel_futures=True)

    # -- shared by every endpoint --------------------------------------------------------------
    async def off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._text_thread, function, *args)

    def check_model(self, name: str | None) -> None:
        """The request's model is the served one (None: the served one, as vLLM), else a 404."""
        if name is not None and name != self.model:
            raise APIError(404, f"model {name!r} is not served here (try {self.model!r})", "model", "not_found_error")

    def check_chat_template(self) -> None:
        if self.backend.tokenizer.chat_template is None:
            raise APIError(400, f"{self.model} has no chat template: use /v1/completions, or start the server "
                           "with --chat-template", "messages")

    def check_host_role(self, param: str) -> None:
        if self.settings.role == "party":
            raise APIError(400, f"{param}: this server is one party's site (--role party): its engine runs only its "
                           "own part of sessions (create one with POST /v1/fedattn/sessions, join with the invitation)",
                           param)

    async def encode(self, segment, param: str) -> list[int]:
        """A segment's token ids: text tokenized (off the event loop), ids checked against the vocabulary."""
        tokenizer = self.backend.tokenizer
        if isinstance(segment, str):
            ids = await self.off_loop(lambda: tokenizer(segment, add_special_tokens=False)["input_ids"])
        else:
            ids = segment
        if not ids:
            raise APIError(400, f"{param}: is empty", param)
        if not all(0 <= t < len(tokenizer) for t in ids):
            raise APIError(400, f"{param}: token ids must be in the vocabulary (0..{len(tokenizer) - 1})", param)
        return ids

    async def encode_prefix(self, prefix) -> list[int]:
        """The public prefix's token ids ([] for none or empty)."""
        return await self.encode(prefix, "public_prefix") if prefix not in (None, "", []) else []

    def plan_of(self, config, participants: int):
        """The config bound to the served model and `participants`; a 400 naming the `fedattn` field if it cannot be."""
        try:
            return config.resolve(self.backend.num_layers, participants)
        except FedAttnConfigError as error:
            raise APIError(400, str(error), f"fedattn.{error.field}") from None

    def sampling_of(self, body, max_tokens: int | None):
        return sampling_params(body, max_tokens, self.backend.sampling_defaults, len(self.backend.tokenizer),
                               self.max_logprobs)

    @staticmethod
    async def unless_disconnected(request: Request, awaitable):
        """The awaitable's result, or None if the client disconnects first (seen within DISCONNECT_POLL_S)."""
        task = asyncio.ensure_future(awaitable)
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None

    def reply(self, result, timings, response_id: str, kind: str, top_logprobs: int | None = None) -> dict:
        return reply(result, timings, response_id, kind, self.model, self.backend.tokenizer.decode, top_logprobs)

    def stream(self, worker_session: str, future, pieces: asyncio.Queue, response_id: str, kind: str,
               index_of: dict[int, int], stream_usage: StreamUsage, timings, segments_param: str,
               top_logprobs: int | None = None) -> StreamingResponse:
        return StreamingResponse(stream_events(self.backend.worker, worker_session, future, pieces, response_id, kind,
                                               self.model, index_of, stream_usage, timings, segments_param,
                                               top_logprobs, self.backend.tokenizer.decode),
                                 media_type="text/event-stream")

    def pieces_sink(self, queues: Callable[[int], asyncio.Queue | None]) -> Callable[[int, Piece], None]:
        """on_piece for the engine thread: a generator's new output into `queues(generator)` (None: not streamed),
        on the event loop."""
        loop = asyncio.get_running_loop()

        def on_piece(generator: int, piece: Piece) -> None:
            if (queue := queues(generator)) is not None:
                loop.call_soon_threadsafe(queue.put_nowait, (generator, piece))

        return on_piece

    # -- the endpoints -------------------------------------------------------------------------
    async def health(self):
        problem = self.backend.worker.health()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)
        return {"status": "ok"}

    @errors_as_values
    async def status(self):
        """What the engine(s) and the coordinator hold now, counts only: sessions, requests, credentials, K/V bytes
        at the coordinator, frames dropped (an operator's check that a failed session left nothing behind)."""
        try:  # EngineDead: a 503 (errors.py)
            holdings = await asyncio.wait_for(asyncio.wrap_future(self.backend.worker.holdings()), 30)
        except TimeoutError:
            raise APIError(503, "the engine thread did not answer within 30 s", None, "server_error") from None
        return {"object": "fedattn.status", "health": self.backend.worker.health() or "ok",
                "open_sessions": len(self.private.sessions) + len(self.issued), **holdings}

    def version(self) -> dict:
        return {"version": package_version("fedattn-vllm"), "vllm": self.vllm_version}

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "fedattn-vllm",
                "max_model_len": self.settings.max_model_len}

    @errors_as_values
    async def model_named(self, name: str):
        self.check_model(name)
        return self.model_card()

    @errors_as_values
    async def tokenize(self, body: TokenizeRequest):
        self.check_model(body.model)
        tokenizer = self.backend.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = await self.off_loop(lambda: tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)[
                "input_ids"])
        else:
            self.check_chat_template()
            ids = await self.off_loop(chat_ids, tokenizer, [m.model_dump() for m in body.messages],
                                      body.add_generation_prompt)
        return {"count": len(ids), "max_model_len": self.settings.max_model_len, "tokens": ids}

    @errors_as_values
    async def detokenize(self, body: DetokenizeRequest):
        self.check_model(body.model)
        tokenizer = self.backend.tokenizer
        if not all(0 <= t < len(tokenizer) for t in body.tokens):
            raise APIError(400, f"tokens: token ids must be in the vocabulary (0..{len(tokenizer) - 1})", "tokens")
        return {"prompt": await self.off_loop(tokenizer.decode, body.tokens)}

    @errors_as_values
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        self.check_host_role("prompt")
        if body.participants is not None and body.prompt in (None, ""):
            body.prompt = None  # SDKs that require `prompt` send "" beside participants
        if (body.prompt is None) == (body.participants is None):
            raise APIError(400, "give exactly one of prompt (single party) or participants (multi-party)", "prompt")
        if body.public_prefix is not None and body.participants is None:
            raise APIError(400, "public_prefix: only with participants (multi-party)", "public_prefix")
        parts = body.participants if body.participants is not None else [body.prompt]
        segments = [await self.encode(p, f"participants[{i}]" if body.participants else "prompt")
                    for i, p in enumerate(parts)]
        prefix = await self.encode_prefix(body.public_prefix)
        return await self._run(request, body, prefix, segments, "text_completion", body.max_tokens or 16,
                               "participants" if body.participants else "prompt")

    @errors_as_values
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        self.check_host_role("messages")
        self.check_chat_template()
        body.max_tokens = body.max_completion_tokens or body.max_tokens  # the newer name wins, as in vLLM
        tokenizer = self.backend.tokenizer
        if bool(body.messages) == (body.participants is not None):  # SDKs that require `messages` send [] beside
            raise APIError(400, "give exactly one of messages (single party) or participants (multi-party)", "messages")
        if body.public_prefix is not None:
            raise APIError(400, "public_prefix: in chat the system message is the public prefix (use `system`)",
                           "public_prefix")
        if body.messages:
            prefix, segments = [], [await self.off_loop(chat_ids, tokenizer, [m.model_dump() for m in body.messages])]
        else:
            for i, part in enumerate(body.participants):
                if not part:
                    raise APIError(400, f"participants[{i}]: is empty", f"participants[{i}]")
            prefix, segments = await self.off_loop(lambda: encode_segments(tokenizer, body.participants, chat=True,
                                                                           system=body.system))
        return await self._run(request, body, prefix, segments, "chat.completion", body.max_tokens,
                               "participants" if body.participants else "messages")

    async def _run(self, request: Request, body, prefix: list[int], segments: list[list[int]], kind: str,
                   max_tokens: int | None, prompt_param: str):
        settings = self.settings
        if len(segments) > settings.max_participants:
            raise APIError(400, f"{len(segments)} participants exceed max_participants={settings.max_participants}",
                           "participants")
        config = session_config(body.fedattn, single=len(segments) == 1)
        plan = self.plan_of(config, len(segments))
        prompt_len = len(prefix) + sum(len(s) for s in segments)
        if prompt_len + (max_tokens or 1) > settings.max_model_len:
            # the one to change: max_tokens when it was asked for and the prompt alone fits
            param = "max_tokens" if body.max_tokens is not None and prompt_len < settings.max_model_len else prompt_param
            raise APIError(400, f"{param}: {prompt_len} prompt tokens + max_tokens="
                           f"{max_tokens} exceed max_model_len={settings.max_model_len}", param)
        sampling = self.sampling_of(body, max_tokens)
        if settings.log_requests:
            log.info("request %s: %d participants, %s, public prefix %d", kind, len(segments),
                     [len(s) for s in segments], len(prefix))
        worker = self.backend.worker
        pieces = asyncio.Queue() if body.stream else None
        try:
            session_id, future, timings = worker.submit(FedAttnSession(segments, config, sampling, public_prefix=prefix),
                                                        self.pieces_sink(lambda g: pieces) if pieces else None)
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        response_id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        if pieces is not None:
            options = body.stream_options
            include = options is not None and bool(options.include_usage)  # continuous stats only with it, as vLLM
            stream_usage = StreamUsage(include, include and bool(options.continuous_usage_stats), prompt_len)
            return self.stream(session_id, future, pieces, response_id, kind,
                               {g: i for i, g in enumerate(sorted(plan.generators))}, stream_usage, timings,
                               prompt_param, body.logprob_count())
        try:
            result = await self.unless_disconnected(request, asyncio.wrap_future(future))
        except (FedAttnConfigError, FedAttnSessionError) as error:
            raise refusal(error, prompt_param) from None
        if result is None:
            worker.cancel(session_id)
            return JSONResponse({}, status_code=499)  # the client left
        if (failed := failure(result, prompt_param)) is not None:
            raise failed
        return self.reply(result, timings, response_id, kind, body.logprob_count())
