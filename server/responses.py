"""What the server answers for a session: the OpenAI reply with FedAttn's usage block, or its server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fedattn_vllm.config import FedAttnConfigError
from fedattn_vllm.federated.client import CoordinatorError
from fedattn_vllm.session import FedAttnSessionError, Piece, SessionResult
from server.errors import APIError, coordinator_error, error_body
from server.logprobs import choice_logprobs
from server.sampling import failure, refusal
from server.worker import Timings


def usage(result: SessionResult) -> dict:
    return _usage(result.cost.prefix_tokens + sum(result.cost.tokens),
                  sum(len(out.token_ids) for out in result.outputs.values()))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class StreamUsage:
    """What a stream reports of its usage (vLLM's `stream_options`): a last chunk with it (`include`), and with
    `continuous` every chunk the usage so far over the session's `prompt_tokens`."""

    include: bool = False
    continuous: bool = False
    prompt_tokens: int = 0


def fedattn_block(result: SessionResult, timings: Timings) -> dict:
    return {
        "participants": len(result.cost.tokens), "tokens": result.cost.tokens,
        "public_prefix_tokens": result.cost.prefix_tokens,
        "sync_layers": list(result.cost.sync_layers),
        "published_bytes": result.cost.published_bytes, "received_bytes": result.cost.received_bytes,
        "timings": {"time_to_first_token_s": timings.first_token_s, "total_s": timings.total_s},
    }


def reply(result: SessionResult, timings: Timings, response_id: str, kind: str, model: str, decode,
          top_logprobs: int | None = None) -> dict:
    """The answer, one choice per generator; `decode(token ids) -> text`; `top_logprobs`: the request asked for
    logprobs with that many alternatives per token."""
    choices = []
    for i, (g, out) in enumerate(sorted(result.outputs.items())):
        logprobs = None
        if top_logprobs is not None and out.logprobs is not None:
            logprobs = choice_logprobs(out.token_ids, out.logprobs, top_logprobs, kind, lambda t: decode([t]))
        content = {"text": out.text} if kind == "text_completion" else \
            {"message": {"role": "assistant", "content": out.text}}
        choices.append({"index": i, "participant": g, **content, "logprobs": logprobs,
                        "finish_reason": out.finish_reason})
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(result), "fedattn": fedattn_block(result, timings)}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def stream_events(worker, session_id: str, future, pieces: asyncio.Queue, response_id: str, kind: str,
                        model: str, index_of: dict[int, int], stream_usage: StreamUsage, timings: Timings,
                        segments_param: str, top_logprobs: int | None = None, decode=None) -> AsyncIterator[str]:
    """Server-sent events: per choice (`index_of`: generator -> choice index) a role delta first (chat), its
    output as `pieces` brings it (with its tokens' logprobs when `top_logprobs` is not None; `decode(token ids)`
    names tokens), a last chunk with its finish reason and the session's `fedattn` block, then the usage
    (`stream_usage`: also the usage so far in every chunk if continuous); or the session's failure as an error
    event. A client that leaves cancels the session."""
    created = int(time.time())
    chunk_object = kind if kind == "text_completion" else f"{kind}.chunk"
    offsets: dict[int, int] = {}  # generator -> where its next token starts (completions' text_offset: token strings)
    generated = 0  # tokens of every choice so far

    def chunk(choices: list[dict], **extra) -> str:
        if stream_usage.continuous:
            extra = {"usage": _usage(stream_usage.prompt_tokens, generated), **extra}
        return _event({"id": response_id, "object": chunk_object, "created": created, "model": model,
                       "choices": choices, **extra})

    def logprobs_of(g: int, piece: Piece | None) -> dict | None:
        if top_logprobs is None or piece is None or piece.logprobs is None:
            return None
        logprobs = choice_logprobs(piece.token_ids, piece.logprobs, top_logprobs, kind, lambda t: decode([t]),
                                   offsets.get(g, 0))
        if kind == "text_completion" and logprobs["tokens"]:
            offsets[g] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return logprobs

    def choice(g: int, piece: Piece | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        text = piece.text if piece is not None else ""
        if kind == "text_completion":
            content = {"text": text, "logprobs": logprobs_of(g, piece)}
        else:
            content = {"delta": {"role": "assistant", "content": text} if role else {"content": text}}
            if (logprobs := logprobs_of(g, piece)) is not None:
                content["logprobs"] = logprobs
        return {"index": index_of[g], "participant": g, **content, "finish_reason": finish_reason}

    # Settled after every piece queued before the result (the engine thread schedules both, in that order).
    settled = asyncio.wrap_future(future)
    try:
        if kind != "text_completion":
            yield chunk([choice(g, role=True) for g in index_of])
        while not (settled.done() and pieces.empty()):
            try:
                generator, piece = await asyncio.wait_for(pieces.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            generated += len(piece.token_ids)
            if piece.text or (top_logprobs is not None and piece.token_ids):
                yield chunk([choice(generator, piece)])
        error = settled.exception()
        if isinstance(error, (FedAttnConfigError, FedAttnSessionError)):
            failed = refusal(error, segments_param)
        elif isinstance(error, CoordinatorError):
            failed = coordinator_error(error)
        elif error is not None:
            failed = APIError(500, str(error), None, "server_error")
        else:
            result = settled.result()
            failed = failure(result, segments_param)
        if failed is not None:
            yield _event(error_body(failed.status, failed.message, failed.kind, failed.param))
        else:
            yield chunk([choice(g, finish_reason=result.outputs[g].finish_reason) for g in index_of],
                        fedattn=fedattn_block(result, timings))
            if stream_usage.include:
                yield chunk([], usage=usage(result))
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:  # the client disconnected mid-stream
        worker.cancel(session_id)
        raise
