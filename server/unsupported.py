"""What of vLLM's OpenAI request fields this server does not do: refused by name, never silently dropped.

The request classes (server/schemas.py) subclass vLLM's and redeclare the fields this server
implements. A field they inherit from vLLM unredeclared is not implemented: a 400 naming it,
unless it holds vLLM's default (clients often send `"n": 1`, `"echo": false`, `"logprobs":
null`). Fields neither server knows are ignored, as vLLM ignores them; `user` (OpenAI's end-user
id), `request_id` and `session_id` are accepted and ignored.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel

ACCEPTED_AND_IGNORED = frozenset({"user", "request_id", "session_id"})  # request_id: vLLM's is fresh per request


@functools.cache
def inherited_defaults(request_class: type[BaseModel]) -> dict[str, object]:
    """The fields `request_class` takes from vLLM's protocol class unredeclared, each with vLLM's default."""
    ours: set[str] = set()
    for klass in request_class.__mro__:
        if klass.__module__.startswith("vllm."):  # vLLM's request class: the fields from here on are vLLM's
            return {name: field.get_default(call_default_factory=True) for name, field in klass.model_fields.items()
                    if name not in ours and name not in ACCEPTED_AND_IGNORED}
        ours |= set(vars(klass).get("__annotations__", {}))
    raise TypeError(f"{request_class.__name__} does not subclass a vLLM request class")


def refused_field(body: BaseModel) -> str | None:
    """The first field of `body` that vLLM's request has, ours does not implement, and is not at vLLM's default."""
    inherited = inherited_defaults(type(body))
    for name, default in inherited.items():  # in vLLM's order of the fields (`tools` before `tool_choice`)
        if name in body.model_fields_set and (value := getattr(body, name)) is not None and value != default:
            return name
    return None
