"""What of vLLM's OpenAI request fields this server does not do: refused by name, never silently dropped.

A request field that vLLM's own server knows (its protocol classes) and ours does not
implement is a 400 naming it, unless it holds vLLM's default (clients often send
`"n": 1`, `"echo": false`, `"logprobs": null`). Fields neither server knows are ignored,
as vLLM ignores them; `user` (OpenAI's end-user id) and `request_id` are accepted and ignored.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel

ACCEPTED_AND_IGNORED = frozenset({"user", "request_id"})  # request_id: vLLM's default is fresh per request


@functools.cache
def vllm_fields(kind: str) -> dict[str, object]:
    """vLLM's request fields for `kind` ('completion' or 'chat'), each with its default (import: seconds)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = {"completion": CompletionRequest, "chat": ChatCompletionRequest}[kind]
    return {name: field.get_default(call_default_factory=True) for name, field in model.model_fields.items()}


def refused_field(body: BaseModel, kind: str) -> str | None:
    """The first field of `body` that vLLM's `kind` request has, ours lacks, and is not at vLLM's default."""
    fields = vllm_fields(kind)
    for name, value in (body.model_extra or {}).items():
        if name not in ACCEPTED_AND_IGNORED and name in fields and value is not None and value != fields[name]:
            return name
    return None
