"""The OpenAI-compatible server on the tiny random Qwen2 (fp32): colocated in this process (the app through
Starlette's TestClient, no socket), federated as a real process with two engine processes on loopback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import (HEADERS, KEY, MODEL, federated_engine, greedy, in_process_server, make_hub_cache, metric,
                      plain_engine, start_server)

from fedattn_vllm.config import RECOMMENDED
from fedattn_vllm.session import FedAttnSession
from fedattn_vllm.prompting import encode_segments
from server.schemas import FedAttnBlock


@pytest.fixture(scope="module")
def server():
    """Colocated: one engine in this process serves every session; a client on the app."""
    with in_process_server("--allowed-origins", '["https://app.example"]') as client:
        yield client


@pytest.fixture(scope="module")
def federated_server_log(tmp_path_factory):
    """Federated: the server and two engine processes, participant n on engine n % 2 (each engine holds at most 4
    sequences: a vLLM engine argument passed through to its processes); (a client on it, its log file)."""
    url, process, log = start_server(tmp_path_factory, "--engines", "2", "--session-timeout-s", "20",
                                     "--max-num-seqs", "4")
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, log
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def federated_server(federated_server_log):
    return federated_server_log[0]


def v1(server: httpx.Client) -> str:
    """The OpenAI base URL of the server `server` is a client on."""
    return f"{str(server.base_url).rstrip('/')}/v1"


def post(server: httpx.Client, path: str, body: dict) -> httpx.Response:
    return server.post(path, json={"model": MODEL, **body}, headers=HEADERS, timeout=60)


def test_models_and_health(server):
    assert server.get(f"/health").json() == {"status": "ok"}
    assert [m["id"] for m in server.get(f"/v1/models", headers=HEADERS).json()["data"]] == [MODEL]


def test_vllms_utility_endpoints(server):
    assert server.get(f"/version").json()["vllm"].startswith("0.32")
    assert server.get(f"/v1/models/{MODEL}", headers=HEADERS).json()["id"] == MODEL
    missing = server.get(f"/v1/models/other", headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    tokens = post(server, "/tokenize", {"prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "hello world"
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    bad = post(server, "/detokenize", {"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    preflight = server.options(f"/v1/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in server.get(f"/health", headers={"Origin": "https://evil"}).headers


def test_metrics_count_tokens_latency_and_rejections_per_model(server):
    label = f'model_name="{MODEL}"'
    before = {name: metric(server, f"{name}{{{label}}}") for name in
              ("fedattn_prompt_tokens_total", "fedattn_generation_tokens_total", "fedattn_e2e_request_latency_seconds_count")}
    refused = metric(server, f'fedattn_requests_rejected_total{{{label},status="401"}}')
    assert post(server, "/v1/completions", {"prompt": list(range(40, 52)), "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True}).status_code == 200
    assert server.post(f"/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    after = {name: metric(server, f"{name}{{{label}}}") for name in before}
    assert [after[n] - before[n] for n in before] == [12, 3, 1]
    assert metric(server, f'fedattn_requests_rejected_total{{{label},status="401"}}') == refused + 1
    text = server.get(f"/metrics").text
    assert f"fedattn_num_requests_running{{{label}}}" in text and f"fedattn_num_requests_waiting{{{label}}}" in text


def test_single_party_completion_equals_plain_vllm(server):
    prompt = list(range(40, 70))
    reply = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    stock = plain_engine(MODEL).generate([{"prompt_token_ids": prompt}], greedy(8), use_tqdm=False)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"] == stock[0].outputs[0].text
    assert reply.json()["usage"] == {"prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38}


def test_multi_party_completion_equals_the_offline_api(server):
    parts = [list(range(10, 30)), list(range(100, 107)), list(range(200, 240))]
    fedattn = {"sync_interval": 2, "generators": [0, 2], "kv_share_ratio": 0.5, "seed": 3,
               "generator_sync_interval": None}  # the paper's semantics: one field away from the default
    body = {"participants": parts, "fedattn": fedattn, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    reply = post(server, "/v1/completions", body).json()
    config = FedAttnBlock(**fedattn).to_config()  # the server's defaults for the rest (K/V as k4v2)
    [expected] = federated_engine(MODEL).generate([FedAttnSession(parts, config, greedy(6))])
    assert [(c["participant"], c["text"]) for c in reply["choices"]] == [(g, o.text) for g, o in expected.outputs.items()]
    assert reply["fedattn"]["published_bytes"] == expected.cost.published_bytes
    assert reply["fedattn"]["received_bytes"] == expected.cost.received_bytes
    assert reply["fedattn"]["tokens"] == [20, 7, 40] and reply["fedattn"]["sync_layers"] == [0, 2, 4]


def test_multi_party_chat_frames_the_parts_as_one_user_turn(server):
    parts = ["alice: the code is 4417. ", "bob: what is the code?"]
    reply = post(server, "/v1/chat/completions", {"participants": parts, "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True}).json()
    llm = federated_engine(MODEL)
    prefix, segments = encode_segments(llm.tokenizer, parts, chat=True)
    default = FedAttnBlock().to_config()  # the server's default: the best measured recall point
    assert default == RECOMMENDED and (default.sync_interval, default.kv_wire.value) == (1, "k4v2")
    [expected] = llm.generate([FedAttnSession(segments, default, greedy(5), public_prefix=prefix)])
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected.outputs[1].text}
    assert reply["object"] == "chat.completion" and reply["fedattn"]["sync_layers"] == list(range(6))
    # the template head (system message, user header) is the public prefix: no participant holds it
    assert reply["fedattn"]["public_prefix_tokens"] == len(prefix) > 0
    assert reply["fedattn"]["tokens"] == [len(s) for s in segments]
    assert reply["usage"]["prompt_tokens"] == len(prefix) + sum(len(s) for s in segments)


def test_a_public_prefix_beside_participants_is_seen_by_all_and_exchanged_by_none(server):
    body = {"participants": [list(range(10, 20)), list(range(40, 47))], "public_prefix": list(range(60, 66)),
            "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "fedattn": {"sync_interval": 2, "generator_sync_interval": 1}}
    reply = post(server, "/v1/completions", body).json()
    config = FedAttnBlock(**body["fedattn"]).to_config()
    [expected] = federated_engine(MODEL).generate([FedAttnSession(body["participants"], config, greedy(4),
                                                                  public_prefix=body["public_prefix"])])
    assert reply["choices"][0]["text"] == expected.outputs[1].text
    assert reply["fedattn"]["published_bytes"] == expected.cost.published_bytes
    assert reply["fedattn"]["public_prefix_tokens"] == 6 and reply["usage"]["prompt_tokens"] == 23


def test_streaming_gives_the_same_text_in_pieces(server):
    body = {"participants": [list(range(10, 30)), list(range(50, 60))], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    pieces, finish = [], None
    with server.stream("POST", f"/v1/completions", json={"model": MODEL, **body, "stream": True},
                      headers=HEADERS, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    assert "".join(pieces) == whole and len(pieces) > 2 and finish == "length"


def test_continuous_usage_stats_give_every_chunk_the_usage_so_far(server):
    """vLLM's `stream_options.continuous_usage_stats` (with include_usage): every chunk carries the usage so far,
    the last ones the whole answer's."""
    body = {"participants": ["alice: the code is 4417. ", "bob: what is the code?"], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "fedattn": {"generators": [0, 1]}}
    whole = post(server, "/v1/chat/completions", body).json()["usage"]
    events = _events(server, "/v1/chat/completions",
                     {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    so_far = [e["usage"]["completion_tokens"] for e in events]
    assert so_far == sorted(so_far) and so_far[0] == 0 and so_far[-1] == whole["completion_tokens"] == 12
    assert {e["usage"]["prompt_tokens"] for e in events} == {whole["prompt_tokens"]} and events[-1]["usage"] == whole
    plain = _events(server, "/v1/chat/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e for e in plain)  # without include_usage: no usage at all, as vLLM


def test_the_openai_clients_stream_helpers_assemble_a_multi_party_chat(server):
    """`client.chat.completions.stream()` (sync and async) over two generators: choice indexes 0 and 1, the
    role first, the usage chunk last, and the same text as the answer in one piece."""
    parts = ["alice: the code is 4417. ", "bob: the room is 12. ", "carol: what is the code?"]
    extra = {"participants": parts, "fedattn": {"generators": [0, 2]}, "ignore_eos": True}
    args = {"model": MODEL, "messages": [], "max_tokens": 6, "temperature": 0, "extra_body": extra}
    whole = post(server, "/v1/chat/completions", {"participants": parts, "fedattn": extra["fedattn"], "max_tokens": 6,
                                                  "temperature": 0, "ignore_eos": True}).json()
    client = openai.OpenAI(base_url=v1(server), api_key=KEY, http_client=server)
    with client.chat.completions.stream(**args, stream_options={"include_usage": True}) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.current_completion_snapshot  # (get_final_completion refuses finish_reason "length")
    assert [c.message.content for c in final.choices] == [c["message"]["content"] for c in whole["choices"]]
    assert [c.message.role for c in final.choices] == ["assistant", "assistant"]
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 12 and final.usage.prompt_tokens == whole["usage"]["prompt_tokens"]
    assert chunks[-2].model_extra["fedattn"]["published_bytes"] == whole["fedattn"]["published_bytes"]

    async def streamed() -> list[str]:  # on the app's own event loop
        app = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app))
        async with openai.AsyncOpenAI(base_url=v1(server), api_key=KEY, http_client=app) as aclient:
            async with aclient.chat.completions.stream(**args) as astream:
                async for _ in astream:
                    pass
                return [c.message.content for c in astream.current_completion_snapshot.choices]

    assert server.portal.call(streamed) == [c["message"]["content"] for c in whole["choices"]]


def test_request_forms_vllm_accepts(server):
    """Text parts as message content, max_completion_tokens, temperature null, top_k."""
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    a = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "top_k": 1,
                                              "max_completion_tokens": 5, "temperature": None, "ignore_eos": True})
    b = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello\nthere"}],
                                              "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    assert a.json()["usage"] == b.json()["usage"] and a.json()["usage"]["completion_tokens"] == 5
    image = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert image.status_code == 400 and image.json()["error"]["param"].startswith("messages[0].content")


@pytest.mark.parametrize("which", ["server", "federated_server"])
def test_vllms_sampling_extensions_reach_the_engines(request, which):
    """logit_bias, allowed_token_ids, min_tokens and stop_token_ids mean what they mean in vLLM, in every mode."""
    url = request.getfixturevalue(which)
    twice = url.post(f"/detokenize", json={"model": MODEL, "tokens": [11] * 4}, headers=HEADERS).json()["prompt"]
    base = {"participants": [[5, 6, 7], [8, 9]], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    for extra in ({"logit_bias": {"11": 100}}, {"allowed_token_ids": [11]}):
        reply = post(url, "/v1/completions", {**base, **extra})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == twice, (extra, reply.text)
    stopped = post(url, "/v1/completions", {**base, "ignore_eos": False, "allowed_token_ids": [11, 12],
                                           "logit_bias": {"11": 100}, "stop_token_ids": [11], "min_tokens": 2})
    assert stopped.json()["usage"]["completion_tokens"] == 3  # stop ignored below min_tokens, then it stops


@pytest.mark.parametrize("which", ["server", "federated_server"])
def test_logprobs_in_the_openai_shapes_equal_the_offline_apis(request, which):
    """Completions (the legacy shape) and chat, colocated and across engine processes: the offline API's values."""
    from vllm import SamplingParams

    url = request.getfixturevalue(which)
    segments = [[5, 6, 7], [8, 9]]
    [expected] = federated_engine(MODEL).generate([FedAttnSession(segments, FedAttnBlock().to_config(), SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logprobs=2))])
    out = expected.outputs[1]
    reply = post(url, "/v1/completions", {"participants": segments, "max_tokens": 3, "temperature": 0,
                                          "ignore_eos": True, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(reply["tokens"]) == 3 and "".join(reply["tokens"]) == out.text
    assert reply["text_offset"] == [len("".join(reply["tokens"][:i])) for i in range(3)] and len(out.logprobs) == 3
    for i, (position, token) in enumerate(zip(out.logprobs, out.token_ids)):
        assert reply["token_logprobs"][i] == pytest.approx(position[token].logprob, abs=1e-4)
        top = reply["top_logprobs"][i]  # as vLLM: the generated token and the 2 best (greedy: one and the same)
        assert len(top) == 2 and top[reply["tokens"][i]] == pytest.approx(reply["token_logprobs"][i])
        assert sorted(top.values(), reverse=True) == pytest.approx([lp.logprob for lp in position.values()], abs=1e-4)
    only = post(url, "/v1/completions", {"participants": segments, "max_tokens": 3, "temperature": 0,
                                         "ignore_eos": True, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert [list(top) for top in only["top_logprobs"]] == [[t] for t in only["tokens"]]  # the generated token
    chat = post(url, "/v1/chat/completions", {"participants": ["a", "b"], "max_tokens": 3, "temperature": 0,
                                              "logprobs": True, "top_logprobs": 1})
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == chat.json()["usage"]["completion_tokens"]
    assert "".join(c["token"] for c in content) == chat.json()["choices"][0]["message"]["content"]
    for c in content:  # greedy: the one alternative is the generated token itself
        assert [(t["token"], t["logprob"]) for t in c["top_logprobs"]] == [(c["token"], c["logprob"])]


def _events(url: httpx.Client, path: str, body: dict) -> list[dict]:
    """A stream's data events, decoded (the [DONE] marker left out)."""
    with url.stream("POST", path, json={"model": MODEL, **body, "stream": True}, headers=HEADERS,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("which", ["server", "federated_server"])
def test_streamed_logprobs_are_the_whole_answers_piece_by_piece(request, which):
    """Each chunk carries its own tokens' logprobs (completions: text_offset into the whole answer); together they
    are the unstreamed answer's, colocated and as the engine processes report them step by step."""
    url = request.getfixturevalue(which)
    body = {"participants": [[5, 6, 7], [8, 9]], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    whole = post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]
    chunks = [e["choices"][0]["logprobs"] for e in _events(url, "/v1/completions", body)
              if e["choices"] and e["choices"][0]["logprobs"]]
    assert len(chunks) > 1  # piece by piece, not at the end
    for key in ("tokens", "text_offset"):
        assert [v for c in chunks for v in c[key]] == whole[key]
    assert [v for c in chunks for v in c["token_logprobs"]] == pytest.approx(whole["token_logprobs"], abs=1e-4)
    chat = {"participants": ["a", "b"], "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 1}
    whole = post(url, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    streamed = [t for e in _events(url, "/v1/chat/completions", chat) if e["choices"]
                for t in (e["choices"][0].get("logprobs") or {}).get("content", [])]
    assert [t["token"] for t in streamed] == [t["token"] for t in whole] and len(whole) == 4


VLLM_FIELDS = [  # (path, field, value, refused): vLLM's fields FedAttn does not do are refused by name
    ("/v1/completions", "echo", True, True), ("/v1/completions", "prompt_logprobs", 2, True),
    ("/v1/completions", "suffix", "x", True), ("/v1/completions", "use_beam_search", True, True),
    ("/v1/chat/completions", "prompt_logprobs", 2, True), ("/v1/chat/completions", "response_format",
                                                        {"type": "json_object"}, True),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}], True),
    ("/v1/completions", "stop_token_ids", [10**6], True), ("/v1/completions", "logit_bias", {"x": 1}, True),
    ("/v1/completions", "allowed_token_ids", [-1], True), ("/v1/completions", "min_tokens", 5, True),
    ("/v1/completions", "logit_bias", {"\u00b2": 1}, True), ("/v1/completions", "logit_bias", {"9" * 5000: 1}, True),
    ("/v1/completions", "bad_words", ["  "], True), ("/v1/chat/completions", "top_logprobs", 2, True),
    ("/v1/completions", "logprobs", 21, True), ("/v1/chat/completions", "logprobs", None, False),
    ("/v1/chat/completions", "top_logprobs", 0, False), ("/v1/completions", "request_id", "r-1", False),
    # at vLLM's default, OpenAI's `user`, and fields neither server knows: accepted
    ("/v1/completions", "echo", False, False), ("/v1/completions", "logprobs", None, False),
    ("/v1/chat/completions", "logprobs", False, False), ("/v1/completions", "user", "u-17", False),
    ("/v1/chat/completions", "tools", None, False), ("/v1/completions", "no_such_field", 1, False),
]


@pytest.mark.parametrize("path,field,value,refused", VLLM_FIELDS,
                         ids=[f"{f}-{'refused' if r else 'accepted'}" for _, f, _, r in VLLM_FIELDS])
def test_vllms_request_fields_are_honoured_or_refused_by_name(server, path, field, value, refused):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    reply = post(server, path, {**body, "max_tokens": 2, field: value})
    if refused:
        assert reply.status_code == 400 and reply.json()["error"]["param"].startswith(field), reply.text
    else:
        assert reply.status_code == 200, reply.text


BAD = [
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"prompt": "x", "participants": ["a", "b"]}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"participants": []}, 400, "participants"),
    ({"participants": ["a", [5, 10**6]]}, 400, "participants[1]"),
    ({"participants": ["a", ""]}, 400, "participants[1]"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 400}, 400, "max_tokens"),
    ({"prompt": list(range(300)), "max_tokens": 4}, 400, "prompt"),
    ({"participants": ["a", "b"], "fedattn": {"sync_interval": 0}}, 400, "fedattn.sync_interval"),
    ({"participants": ["a", "b"], "fedattn": {"generators": [5]}}, 400, "fedattn.generators"),
    ({"participants": ["a", "b"], "fedattn": {"placement": "sideways"}}, 400, "fedattn.placement"),
    ({"participants": ["a", "b"], "fedattn": {"bogus": 1}}, 400, "fedattn.bogus"),
    ({"participants": ["a", "b"], "fedattn": {"kv_share_ratio": [0.5]}}, 400, "fedattn.kv_share_ratio"),
    ({"participants": ["a", "b"], "fedattn": {"generator_sync_interval": 0}}, 400, "fedattn.generator_sync_interval"),
    ({"prompt": "x", "public_prefix": "shared"}, 400, "public_prefix"),
    ({"participants": ["a", "b"], "public_prefix": [5, 10**6]}, 400, "public_prefix"),
    ({"participants": ["a", "b"], "public_prefix": [5] * 250, "max_tokens": 8}, 400, "max_tokens"),
    ({"participants": ["a", "b"], "public_prefix": [5] * 260, "max_tokens": 8}, 400, "participants"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_naming_the_field(server, body, status, param):
    reply = server.post(f"/v1/completions", json={"model": MODEL, **body}, headers=HEADERS, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200  # still serving


def test_a_missing_api_key_is_refused(server):
    reply = server.post(f"/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == 401


def test_the_openai_client_as_is(server):
    client = openai.OpenAI(base_url=v1(server), api_key=KEY, http_client=server)
    single = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert single.choices[0].text and single.usage.completion_tokens == 3
    multi = client.chat.completions.create(
        model=MODEL, messages=[], max_tokens=3, temperature=0,
        extra_body={"participants": ["alice: 4417. ", "bob: the code?"], "fedattn": {"sync_interval": 2}})
    assert multi.choices[0].message.content is not None
    assert multi.model_extra["fedattn"]["participants"] == 2
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="", max_tokens=3, extra_body={"fedattn": {"sync_interval": -1}})
    assert raised.value.body["param"] == "prompt"


def create_session(server, **body) -> dict:
    reply = server.post(f"/v1/fedattn/sessions", json={"model": MODEL, **body}, headers=HEADERS, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def join(server, session: dict, n: int, content, **extra) -> httpx.Response:
    token = session["participants"][n]["token"]
    return server.post(f"/v1/fedattn/sessions/{session['id']}/participants/{n}",
                      json={"token": token, "content": content, **extra}, headers=HEADERS, timeout=60)


def test_private_session_clients_each_send_only_their_part_and_get_the_joint_answer(server):
    parts = ["alice: the vault code is 4417. ", "bob: the vault is in the cellar. ", "carol: what is the code?"]
    sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "system": "You answer in one word.",
                "fedattn": {"sync_interval": 2, "generator_sync_interval": 1}}
    session = create_session(server, participants=3, logprobs=2, **sampling)
    assert session["generators"] == [2] and len({p["token"] for p in session["participants"]}) == 3
    with ThreadPoolExecutor(3) as pool:  # three clients, concurrently, each with its own text only
        replies = list(pool.map(lambda n: join(server, session, n, parts[n]), range(3)))
    assert [r.status_code for r in replies] == [200, 200, 200]
    one_call = post(server, "/v1/chat/completions", {"participants": parts, "logprobs": True, "top_logprobs": 2,
                                                     **sampling}).json()
    answer = replies[2].json()
    assert answer["choices"][0]["message"]["content"] == one_call["choices"][0]["message"]["content"]
    assert answer["choices"][0]["logprobs"] == one_call["choices"][0]["logprobs"]  # 6 tokens, 2 alternatives each
    assert [len(t["top_logprobs"]) for t in answer["choices"][0]["logprobs"]["content"]] == [2] * 6
    assert answer["fedattn"]["published_bytes"] == one_call["fedattn"]["published_bytes"]
    for reply in replies[:2]:  # the others get a usage record, not the answer
        assert reply.json()["object"] == "fedattn.participation" and "choices" not in reply.json()
        n = reply.json()["participant"]  # its own part's numbers, no other party's
        assert reply.json()["fedattn"]["tokens"] == one_call["fedattn"]["tokens"][n]
        assert reply.json()["fedattn"]["published_bytes"] == one_call["fedattn"]["published_bytes"][n]
    assert answer["fedattn"]["public_prefix_tokens"] == one_call["fedattn"]["public_prefix_tokens"] > 0


def test_private_session_refuses_bad_tokens_and_double_joins(server):
    session = create_session(server, participants=2, max_tokens=2, join_timeout_s=5)
    forged = server.post(f"/v1/fedattn/sessions/{session['id']}/participants/0",
                        json={"token": "guess", "content": "x"}, headers=HEADERS)
    assert forged.status_code == 403 and forged.json()["error"]["param"] == "token"
    assert server.post(f"/v1/fedattn/sessions/nope/participants/0", json={"token": "t", "content": "x"},
                      headers=HEADERS).status_code == 404
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(join, server, session, 0, "hello")
        time.sleep(0.5)
        assert join(server, session, 0, "again").status_code == 409
        assert join(server, session, 1, "there").status_code == 200
        assert first.result().status_code == 200


def test_a_participant_that_never_joins_fails_the_session_for_everyone(server):
    session = create_session(server, participants=3, max_tokens=2, join_timeout_s=2)
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda n: join(server, session, n, f"part {n}"), range(2)))
    assert 2 <= time.monotonic() - started < 60  # after the join timeout, not hanging (loose: loaded CI boxes)
    for reply in replies:
        assert reply.status_code == 408 and "[2] did not join" in reply.json()["error"]["message"]
    assert join(server, session, 2, "late").status_code == 404  # nothing of it is kept


def test_a_streaming_generator_that_disconnects_ends_its_private_session(federated_server):
    """A real socket closed mid-answer (the in-process client reads every answer whole)."""
    server = federated_server
    before = metric(server, 'fedattn_sessions_total{model_name="tiny-qwen2",outcome="cancelled"}')
    session = create_session(server, participants=2, max_tokens=200, ignore_eos=True, chat=False)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(join, server, session, 0, list(range(10, 30)))
        body = {"token": session["participants"][1]["token"], "content": list(range(40, 50)), "stream": True}
        path = f"/v1/fedattn/sessions/{session['id']}/participants/1"
        with server.stream("POST", path, json=body, headers=HEADERS, timeout=60) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the answer started; then this client leaves
        reply = other.result()
    assert reply.status_code == 409 and reply.json()["error"]["type"] == "cancelled_error"
    assert metric(server, 'fedattn_sessions_total{model_name="tiny-qwen2",outcome="cancelled"}') == before + 1


def test_federated_engines_behind_the_server_answer_like_the_offline_api(federated_server):
    parts = [list(range(10, 30)), list(range(100, 107)), list(range(200, 240))]
    fedattn = {"sync_interval": 2, "generators": [0, 2]}
    body = {"participants": parts, "fedattn": fedattn, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    reply = post(federated_server, "/v1/completions", body).json()
    config = FedAttnBlock(**fedattn).to_config()  # the server's defaults for the rest: generators read every layer
    assert config.generator_sync_interval == 1
    [expected] = federated_engine(MODEL).generate([FedAttnSession(parts, config, greedy(6))])
    assert [(c["participant"], c["text"]) for c in reply["choices"]] == [(g, o.text) for g, o in expected.outputs.items()]
    assert reply["fedattn"]["published_bytes"] == expected.cost.published_bytes
    single = post(federated_server, "/v1/completions", {"prompt": parts[0], "max_tokens": 4, "temperature": 0})
    assert single.status_code == 200
    bad = post(federated_server, "/v1/completions", {"participants": ["a", [5, 10**6]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "participants[1]"


def test_engine_arguments_reach_the_federated_engines(federated_server):
    """--max-num-seqs 4 in each engine process: 8 participants fit (4 each), 9 never can."""
    assert post(federated_server, "/v1/completions", {"participants": [[5, 6]] * 8, "max_tokens": 1}).status_code == 200
    refused = post(federated_server, "/v1/completions", {"participants": [[5, 6]] * 9, "max_tokens": 1})
    assert refused.status_code == 400 and "5 participants exceed max_num_seqs=4" in refused.json()["error"]["message"]


def test_federated_private_session(federated_server):
    parts = ["alice: the vault code is 4417. ", "carol: what is the code?"]
    session = create_session(federated_server, participants=2, max_tokens=4, temperature=0, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda n: join(federated_server, session, n, parts[n]), range(2)))
    one_call = post(federated_server, "/v1/chat/completions", {"participants": parts, "max_tokens": 4,
                                                               "temperature": 0, "ignore_eos": True}).json()
    assert replies[1].json()["choices"][0]["message"] == one_call["choices"][0]["message"]
    assert replies[0].json()["object"] == "fedattn.participation"


def test_the_one_call_example_runs_against_federated_engines(federated_server):
    """examples/one_call.py with the openai client."""
    example = subprocess.run([sys.executable, "examples/one_call.py", "--base-url", v1(federated_server),
                              "--api-key", KEY], capture_output=True, text=True, timeout=300)
    assert example.returncode == 0, example.stderr[-2000:]
    assert example.stdout.count("time to first token") == 4 and "an ordinary single-party chat request" in example.stdout


def test_federated_streams_arrive_token_by_token(federated_server):
    body = {"participants": [list(range(10, 30)), list(range(50, 60))], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    whole = post(federated_server, "/v1/completions", body).json()
    pieces = []
    with federated_server.stream("POST", f"/v1/completions", json={"model": MODEL, **body, "stream": True},
                      headers=HEADERS, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]) and choices[0]["text"]:
                pieces.append(choices[0]["text"])
    assert "".join(pieces) == whole["choices"][0]["text"] and len(pieces) > 2
    timings = whole["fedattn"]["timings"]
    assert 0 < timings["time_to_first_token_s"] < timings["total_s"]


def test_a_hub_model_named_like_vllm_users_name_it(tmp_path_factory, monkeypatch):
    """`python -m server Qwen2.5-Tiny` (positional, bare name, offline from the Hub cache), federated engines too;
    a base model (no chat template) serves completions, refuses chat, and says so in the log."""
    make_hub_cache(tmp_path_factory.mktemp("hf"), monkeypatch)
    url, process, log = start_server(tmp_path_factory, "--engines", "2", model="Qwen2.5-Tiny")
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=HEADERS).json()["data"]] == ["Qwen2.5-Tiny"]
        body = {"model": "Qwen2.5-Tiny", "participants": [list(range(10, 20)), list(range(30, 36))], "max_tokens": 3,
                "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        unsaid = {"model": "Qwen2.5-Tiny", "prompt": list(range(40, 60)), "max_tokens": 6, "ignore_eos": True}
        texts = [httpx.post(f"{url}/v1/completions", json={**unsaid, **extra}, headers=HEADERS,
                            timeout=60).json()["choices"][0]["text"] for extra in ({}, {}, {"temperature": 0})]
        assert texts[0] == texts[1] == texts[2]  # the model's generation_config: greedy
        chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "Qwen2.5-Tiny", "messages": [
            {"role": "user", "content": "hi"}]}, headers=HEADERS, timeout=60)
        assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
        assert log.read_text().count("has no chat template (a base model?)") == 1
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_prompts_are_never_logged(server, federated_server_log, capfd, caplog):
    """Colocated (every log record and everything written to stdout/stderr in this process, vLLM's included) and
    federated (the server process's log)."""
    caplog.set_level(logging.DEBUG)
    vllm_logger = logging.getLogger("vllm")  # it does not propagate: its records reach caplog only so
    vllm_logger.addHandler(caplog.handler)
    secret = "zebra-quartz-7781 is the password"
    try:
        for client in (server, federated_server_log[0]):
            assert post(client, "/v1/completions", {"participants": [secret, "what is it?"],
                                                    "max_tokens": 2}).status_code == 200
            assert post(client, "/v1/completions", {"prompt": secret, "max_tokens": 2}).status_code == 200
    finally:
        vllm_logger.removeHandler(caplog.handler)
    written = capfd.readouterr()
    for text in (written.out, written.err, caplog.text, federated_server_log[1].read_text(errors="replace")):
        assert "zebra-quartz" not in text
