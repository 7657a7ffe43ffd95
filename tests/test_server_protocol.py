"""The request models on vLLM's protocol classes (server/schemas.py): which of vLLM's fields this server
implements, which it refuses, and that vLLM's own to_sampling_params gives the engine's sampling."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VLLMCompletion

from server.errors import APIError
from server.sampling import sampling_params
from server.schemas import ChatCompletionRequest, CompletionRequest, SessionCreateRequest
from server.unsupported import inherited_defaults, refused_field

HI = [{"role": "user", "content": "hi"}]
SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "stop", "stream", "stream_options", "ignore_eos", "min_tokens",
            "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
            "logit_bias", "allowed_token_ids", "bad_words", "model"}


@pytest.mark.parametrize("ours,theirs,implemented", [
    (CompletionRequest, VLLMCompletion, SAMPLING | {"prompt", "logprobs"}),
    (ChatCompletionRequest, VLLMChat, SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}),
    (SessionCreateRequest, VLLMCompletion, SAMPLING | {"logprobs"})])
def test_every_vllm_field_is_implemented_or_inherited_at_its_default(ours, theirs, implemented):
    inherited = inherited_defaults(ours)
    assert set(theirs.model_fields) - set(inherited) == implemented | {"user", "request_id", "session_id"}
    assert set(inherited) <= set(ours.model_fields)  # parsed with vLLM's own types


@pytest.mark.parametrize("field,value", [("n", 2), ("echo", True), ("suffix", "x"), ("use_beam_search", True),
                                         ("prompt_logprobs", 1), ("response_format", {"type": "json_object"}),
                                         ("priority", 3), ("vllm_xargs", {"a": 1})])
def test_a_vllm_field_off_its_default_is_refused_by_name(field, value):
    assert refused_field(CompletionRequest(prompt="x", **{field: value})) == field
    with pytest.raises(APIError) as refused:
        sampling_params(CompletionRequest(prompt="x", **{field: value}), 4, {}, 100, 20)
    assert refused.value.status == 400 and refused.value.param == field


def test_vllm_fields_at_their_defaults_and_unknown_fields_pass():
    body = CompletionRequest(prompt="x", n=1, echo=False, use_beam_search=False, user="u", request_id="r", foo=1)
    assert refused_field(body) is None
    chat = ChatCompletionRequest(messages=HI, tools=[{"type": "function", "function": {"name": "f"}}])
    assert refused_field(chat) == "tools"  # before the tool_choice vLLM's validator sets beside it


def test_sampling_is_vllms_with_the_models_defaults_under_the_requests_values():
    defaults = {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.05}
    params = sampling_params(ChatCompletionRequest(messages=HI, top_k=5, seed=3, logprobs=True, top_logprobs=2,
                                                   stop="END"), 9, defaults, 100, 20)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.7, 5, 1.05)
    assert (params.max_tokens, params.seed, params.logprobs, params.stop) == (9, 3, 2, ["END"])
    assert sampling_params(CompletionRequest(prompt="x"), 4, {}, 100, 20).temperature == 1.0  # OpenAI's default


@pytest.mark.parametrize("body", [{"messages": 5}, {"messages": HI, "structured_outputs": "x"},
                                  {"messages": HI, "max_tokens": 0}, {"messages": HI, "seed": -1}])
def test_malformed_shapes_are_validation_errors_never_crashes(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**body)


def test_multi_party_bodies_need_no_prompt_or_messages_and_sessions_refuse_unknown_fields():
    assert CompletionRequest(participants=["a", "b"]).prompt is None
    assert ChatCompletionRequest(participants=["a"], messages=None).messages == []  # null beside participants
    assert SessionCreateRequest(participants=2).model is None  # the served model
    with pytest.raises(ValidationError, match="top_logprobs"):
        SessionCreateRequest(participants=2, top_logprobs=0)
