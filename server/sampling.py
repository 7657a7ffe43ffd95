"""A request's engine objects and a session's outcome as errors: pure functions of the serving layer.

`sampling_params` turns a request into vLLM's SamplingParams (by vLLM's own rule: its values, else the
model's generation_config, else OpenAI's; what this server cannot do refused by name); `session_config`
its `fedattn` block into a FedAttnConfig; `refusal` and `failure` a refused or failed session into the
APIError it answers.
"""

from __future__ import annotations

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError
from fedattn_vllm.session import FedAttnSessionError, SessionResult
from server.errors import APIError
from server.schemas import FedAttnBlock
from server.unsupported import refused_field


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Chat messages under the model's chat template, as token ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling_params(body, max_tokens: int | None, defaults: dict, vocab: int, max_logprobs: int):
    """vLLM's SamplingParams of the request, by vLLM's own `to_sampling_params`: its values, else the model's
    generation_config (`defaults`), else OpenAI's; a field of vLLM's request this server does not do, a token id
    outside the vocabulary, or what vLLM refuses is a 400."""
    from vllm.exceptions import VLLMValidationError

    if (name := refused_field(body)) is not None:
        raise APIError(400, f"{name}: not supported by this server (a field of vLLM's OpenAI server that FedAttn "
                       "sessions do not implement; README: compatibility)", name)
    if (name := body.token_ids_outside(vocab)) is not None:
        raise APIError(400, f"{name}: token ids must be in the vocabulary (0..{vocab - 1})", name)
    if body.logprob_count() is not None and body.logprob_count() > max_logprobs:
        raise APIError(400, f"logprobs: at most {max_logprobs} alternatives per token (the engine's max_logprobs)",
                       "top_logprobs" if "top_logprobs" in type(body).model_fields else "logprobs")
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens: {body.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
    try:
        return body.to_sampling_params(max_tokens, defaults)
    except (ValueError, VLLMValidationError) as error:
        raise APIError(400, f"sampling parameters: {error}", getattr(error, "parameter", None)) from None


def refusal(error: FedAttnConfigError | FedAttnSessionError, segments_param: str) -> APIError:
    """A session the worker refused before it ran: a 400 naming the field (`segments_param` for a part)."""
    if isinstance(error, FedAttnConfigError):
        return APIError(400, str(error), f"fedattn.{error.field}")
    param = segments_param if error.field == "segments" else error.field
    return APIError(400, f"{param}: {str(error).split(': ', 1)[-1]}", param)


def failure(result: SessionResult, segments_param: str) -> APIError | None:
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


def session_config(block: FedAttnBlock | None, single: bool) -> FedAttnConfig:
    """The session's config; a single party is plain inference (nothing to share with anyone)."""
    try:
        config = (block or FedAttnBlock()).to_config()
    except FedAttnConfigError as error:
        raise APIError(400, str(error), f"fedattn.{error.field}") from None
    return FedAttnConfig(placement="explicit", sync_layers=()) if single else config

