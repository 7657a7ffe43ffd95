"""Hostile HTTP input against the real server process (tiny random Qwen2): a clear 4xx in the OpenAI shape,
and the server keeps answering. First a matrix over every field of every endpoint, sent to a colocated
server and to a federated one (engine processes and a coordinator behind it); then one regression test
per way the server was once wedged or crashed."""

from __future__ import annotations

import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import HEADERS, MODEL, assert_nothing_held, metric, start_server

MAX_SESSIONS, MAX_BODY = 4, 256 << 10
NAN, INF = float("nan"), float("inf")


def _serve(tmp_path_factory, *flags: str):
    url, process, _ = start_server(tmp_path_factory, "--max-sessions", str(MAX_SESSIONS),
                                   "--max-body-bytes", str(MAX_BODY), *flags)
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Colocated: one in-process engine."""
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def federated_server(tmp_path_factory):
    """Federated: a coordinator and two engine processes behind the orchestrator."""
    yield from _serve(tmp_path_factory, "--engines", "2")


def _cases() -> list[tuple[str, str, object]]:
    """(method, path, JSON body or raw bytes): at least 150 hostile requests."""
    ok_completion = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    ok_multi = {"model": MODEL, "participants": ["a", "b"], "max_tokens": 2}
    ok_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    junk = [None, -1, 0, 2**63, 2**64, -2**70, 1.5, NAN, INF, -INF, "", "x" * 5000, [], [None], {}, {"a": 1}, True]
    sampling = {
        "model": [-1, 0, "other", 7],  # null is the served model, as in vLLM (COERCED)
        "max_tokens": [-1, 0, 2**64, 1e9, NAN, INF, []],
        "temperature": [-1, 3, NAN, INF, "hot", []],
        "top_p": [0, 2, NAN, -INF],
        "seed": [-1, 2**63, 2**64, 2**70, 1.5, NAN],
        "stop": [[""], "", [1], ["a"] * 100, {"a": 1}, [None]],
        "n": [2, 0, -1, 2**64],
        "stream": [2, {}],
        "presence_penalty": [5, NAN, -INF],
        "frequency_penalty": [-3, INF],
        "ignore_eos": ["x", [], 2],
    }
    cases: list[tuple[str, str, object]] = []
    for body in (ok_completion, ok_chat):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        for field, values in sampling.items():
            cases += [("POST", path, {**body, field: v}) for v in values]
    cases += [("POST", "/v1/completions", {**ok_completion, "prompt": v})
              for v in [123, [], [-1], [2**64], [1.5], "", {"a": 1}, [[1, 2]], None]]
    cases += [("POST", "/v1/completions", {**ok_multi, "participants": v})
              for v in [[], "ab", [""], [None], [[]], [[-5]], ["a"] * 100, [123], [[2**40]], {"0": "a"}]]
    fedattn = [{"sync_interval": 0}, {"sync_interval": 2**70}, {"sync_interval": NAN}, {"seed": 2**64}, {"seed": -1},
               {"seed": 2**70}, {"generators": [99]}, {"generators": []}, {"generators": "all"}, {"kv_wire": "int3"},
               {"placement": "explicit", "sync_layers": [999]}, {"placement": "explicit", "sync_layers": [-1]},
               {"kv_share_ratio": NAN}, {"kv_share_ratio": 0}, {"kv_share_ratio": [0.5] * 100},
               {"publisher": 2**40}, {"unknown": 1}, {"local_keep_ratio": 0}, {"generator_sync_interval": -3},
               {"publisher_sync_interval": 2**63}, "x", [], 5]
    cases += [("POST", "/v1/completions", {**ok_multi, "fedattn": v}) for v in fedattn]
    cases += [("POST", "/v1/completions", {**ok_multi, "public_prefix": v}) for v in [5, [-1], [2**40], {"a": 1}]]
    cases += [("POST", "/v1/chat/completions", {**ok_chat, "messages": v})
              for v in ["x", [{}], [{"role": "bad", "content": "x"}], [{"role": "user", "content": None}],
                        [{"role": "user"}], [None], {"role": "user"}, 5, [{"role": "user", "content": [{"type": "image_url"}]}]]]
    # vLLM's fields this server does not implement, and shapes vLLM's own validators once crashed on
    cases += [("POST", path, {**body, field: v}) for path, body in (("/v1/completions", ok_completion),
                                                                   ("/v1/chat/completions", ok_chat))
              for field, v in [("structured_outputs", "x"), ("structured_outputs", {"regex": "a+"}),
                               ("response_format", "x"), ("response_format", {"type": "json_object"}),
                               ("stream_options", {"include_usage": True}), ("use_beam_search", True),
                               ("prompt_logprobs", 1), ("prompt_logprobs", "x"), ("vllm_xargs", {"a": 1}),
                               ("priority", 1), ("truncate_prompt_tokens", 5), ("logprob_token_ids", [1])]]
    cases += [("POST", "/v1/chat/completions", {**ok_chat, field: v})
              for field, v in [("tools", []), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                               ("tool_choice", {"function": "x"}), ("tool_choice", "maybe"), ("documents", [{}]),
                               ("chat_template_kwargs", {"a": 1}), ("continue_final_message", True),
                               ("stream_options", {"include_usage": True, "continuous_usage_stats": True})]]
    cases += [("POST", "/v1/completions", {**ok_completion, field: v})
              for field, v in [("suffix", "x"), ("echo", True), ("prompt", ["a", "b"]), ("prompt_embeds", "eA==")]]
    cases += [("POST", "/v1/chat/completions", {**ok_chat, "messages": None, "participants": v, "system": s})
              for v, s in [(["a", ""], None), (["a", 5], None), (["a"], 7), ([], "x")]]
    session = {"model": MODEL, "participants": 2, "max_tokens": 2, "join_timeout_s": 1}  # a valid one expires at once
    cases += [("POST", "/v1/fedattn/sessions", {**session, field: v}) for field, values in {
        "participants": [0, -1, 2**63, 17, NAN], "join_timeout_s": [0, 1e9, NAN, INF, "soon"],
        "chat": ["x"], "fedattn": [{"sync_interval": 0}, "x"], "system": [5], "public_prefix": [[-1]],
        "echo": [True], "logit_bias": [{"99999999": 5}, {"1": NAN}, {"\u00b2": 1}], "top_logprobs": [3],
        "min_tokens": [5], "bad_words": [[" "]], "top_logprobs": [0], "prompt": ["x"], "unknown": [1]}.items()
        for v in values]
    cases += [("POST", f"/v1/fedattn/sessions/{sid}/participants/{n}", {"token": "t", "content": "x"})
              for sid, n in [("nope", 0), ("nope", -1), ("nope", 2**70), ("nope", "abc"), ("x" * 3000, 0)]]
    cases += [("POST", "/v1/fedattn/sessions/nope/participants/0", v)
              for v in [{"token": 1, "content": "x"}, {"token": "t", "content": ""}, {"token": "t", "content": [-1]},
                        {"token": "t"}, {"token": "t", "content": "x", "stream": "x"}, {"token": "t", "content": None}]]
    cases += [("DELETE", "/v1/fedattn/sessions/nope", None), ("GET", "/v1/fedattn/sessions/nope", None),
              ("PUT", "/v1/completions", ok_completion), ("GET", "/v1/completions", None), ("POST", "/v1/nothing", {})]
    raw = [b"{not json", b'{"model": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000, b"", b"null", b"[1, 2]", b'"x"',
           b'{"model": "tiny-qwen2", "prompt": "x", "max_tokens": NaN}', b"\x00" * 64, b"x" * (MAX_BODY + 1)]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/fedattn/sessions"):
        cases += [("POST", path, body) for body in raw]
    cases += [("POST", "/v1/completions", {**ok_completion, "prompt": junk_value}) for junk_value in junk]
    return cases


CASES = _cases()


def _coerced() -> list[tuple[str, str, dict]]:
    """Odd-looking values vLLM's own request models accept (pydantic's lax mode turns a numeric string into a
    number, true into 1, "yes" into true; a null model is the served one; vLLM's fields at their defaults):
    accepted, and answered in the success shape."""
    ok = {"/v1/completions": {"model": MODEL, "prompt": "x", "max_tokens": 2},
          "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    values = {"max_tokens": ["10", True], "top_p": ["1"], "seed": ["1"], "stream": ["yes"], "model": [None],
              "n": [1], "echo": [False], "use_beam_search": [False], "user": ["someone"], "request_id": ["r"]}
    cases = [("POST", path, {**body, field: v}) for path, body in ok.items() for field, vs in values.items() for v in vs]
    cases.append(("POST", "/v1/completions", {**ok["/v1/completions"], "prompt": [True]}))  # token id 1
    cases.append(("POST", "/v1/chat/completions", {**ok["/v1/chat/completions"], "n": None}))  # chat's n is optional
    session = {"model": MODEL, "participants": 2, "max_tokens": 2, "join_timeout_s": 1}
    cases += [("POST", "/v1/fedattn/sessions", {**session, "participants": "3"}),
              ("POST", "/v1/fedattn/sessions", {**session, "n": 1})]  # vLLM's default
    return cases


COERCED = _coerced()


def test_the_hostile_matrix_has_at_least_150_cases():
    assert len(CASES) >= 150, len(CASES)


def _send(server: str, method: str, path: str, body) -> httpx.Response:
    """JSON bodies as Python writes them: NaN and Infinity included, as JavaScript clients send them."""
    if body is None:
        return httpx.request(method, f"{server}{path}", headers=HEADERS, timeout=30)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.request(method, f"{server}{path}", content=content, timeout=30,
                         headers={**HEADERS, "content-type": "application/json"})


@pytest.mark.parametrize("topology", ["colocated", "federated"])
@pytest.mark.parametrize("method,path,body", CASES, ids=[f"{i}-{c[1].split('/')[-1]}" for i, c in enumerate(CASES)])
def test_hostile_requests_get_a_4xx_in_the_openai_shape_and_the_server_keeps_serving(request, topology, method,
                                                                                     path, body):
    server = request.getfixturevalue("server" if topology == "colocated" else "federated_server")
    reply = _send(server, method, path, body)
    assert 400 <= reply.status_code < 500, reply.text  # every case is refused (COERCED lists those accepted)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["code"] == reply.status_code  # as vLLM's server
    declared = _declared_statuses(server, method, path)
    assert declared is None or str(reply.status_code) in declared, (reply.status_code, declared)  # the schema
    _assert_still_serving(server)


@pytest.mark.parametrize("method,path,body", COERCED, ids=[f"{i}-{c[1].split('/')[-1]}" for i, c in enumerate(COERCED)])
def test_values_coerced_like_vllms_models_are_answered_in_the_success_shape(server, method, path, body):
    reply = _send(server, method, path, body)
    assert reply.status_code == 200, reply.text
    if body.get("stream"):
        events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and all("error" not in json.loads(e[6:]) for e in events[:-1])
    elif path == "/v1/fedattn/sessions":
        assert reply.json()["object"] == "fedattn.session" and len(reply.json()["participants"]) == int(
            body["participants"])
    else:
        answer = reply.json()
        assert answer["object"] in ("text_completion", "chat.completion") and len(answer["choices"]) == 1
        assert answer["usage"]["completion_tokens"] >= 1
    _assert_still_serving(server)


def _assert_still_serving(server: str) -> None:
    for ok in ({"prompt": [5, 6, 7]}, {"participants": [[5, 6, 7], [8, 9]]}):
        answer = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "max_tokens": 1, **ok},
                            headers=HEADERS, timeout=60)
        assert answer.status_code == 200, answer.text
    assert httpx.get(f"{server}/health").status_code == 200
    assert_nothing_held(server)  # a refused or failed request leaves nothing in any engine or the coordinator


@functools.cache
def _openapi(server: str) -> dict:
    return httpx.get(f"{server}/openapi.json", timeout=30).json()


def _declared_statuses(server: str, method: str, path: str) -> set[str] | None:
    """The statuses /openapi.json declares for the operation `path` matches (None: no such operation)."""
    parts = path.split("/")
    for template, operations in _openapi(server)["paths"].items():
        pattern = template.split("/")
        if len(pattern) == len(parts) and all(p == q or p.startswith("{") for p, q in zip(pattern, parts)):
            operation = operations.get(method.lower())
            return None if operation is None else set(operation["responses"])
    return None


def test_the_schema_declares_the_error_shape_and_no_422(server):
    """Validation errors are 400s here (FastAPI would declare 422): every /v1 operation lists 400 with the
    OpenAI error body."""
    schema = _openapi(server)
    assert '"422"' not in json.dumps(schema)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                error = operation["responses"]["400"]["content"]["application/json"]["schema"]
                assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]


VALID_BODIES = {"/v1/completions": {"prompt": "x", "max_tokens": 2},
                "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                "/v1/fedattn/sessions": {"participants": 2, "max_tokens": 2, "join_timeout_s": 1}}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml",
                                          "multipart/form-data; boundary=x", "application/json; charset=utf-8"])
@pytest.mark.parametrize("path", list(VALID_BODIES))
def test_a_valid_body_declared_as_another_content_type_is_refused_in_the_openai_shape(server, path, content_type):
    body = json.dumps({"model": MODEL, **VALID_BODIES[path]}).encode()
    reply = httpx.post(f"{server}{path}", content=body, timeout=30, headers={**HEADERS, "content-type": content_type})
    if content_type.startswith("application/json"):
        assert reply.status_code == 200, reply.text
    else:
        assert 400 <= reply.status_code < 500, reply.text
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json={"model": MODEL, **body}, headers=HEADERS, timeout=60)


def test_huge_seeds_are_refused_at_the_edge(server):
    """Once, a seed of 2**64 (vLLM's own check) or a FedAttn seed of 2**70 killed the engine thread."""
    reply = _post(server, "/v1/completions", {"prompt": "x", "seed": 2**64, "max_tokens": 2})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "seed"
    reply = _post(server, "/v1/completions", {"participants": ["a", "b"], "fedattn": {"seed": 2**70}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "fedattn.seed"
    assert _post(server, "/v1/completions", {"prompt": "x", "seed": 2**63 - 1, "max_tokens": 2}).status_code == 200


def test_an_empty_stop_string_and_the_old_chat_marker_are_not_500s(server):
    reply = _post(server, "/v1/completions", {"prompt": "x", "stop": [""]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop[0]"
    marker = "\x00FEDATTN_CONTENT\x00"  # the fixed marker the chat template used to be split on
    reply = _post(server, "/v1/chat/completions", {"participants": ["a", "b"], "system": f"say {marker}", "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def test_unreadable_bodies_get_the_openai_shape(server):
    for raw in (b'{"model": "\xff"}', b"[" * 50_000 + b"]" * 50_000, b"{oops"):
        reply = httpx.post(f"{server}/v1/completions", content=raw, timeout=30,
                           headers={**HEADERS, "content-type": "application/json"})
        assert reply.status_code == 400 and "error" in reply.json() and "detail" not in reply.json()


def test_a_body_over_the_cap_is_refused_without_being_read(server):
    reply = _post(server, "/v1/completions", {"prompt": "x" * MAX_BODY})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    reply = httpx.post(f"{server}/v1/completions", content=chunks(), timeout=30,
                       headers={**HEADERS, "content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == 413


def test_tokenizing_a_long_prompt_does_not_stall_the_server(server):
    """Once, a 4 MB prompt stalled /health for 19.5 s: tokenizing ran on the event loop."""
    prompt = "lorem ipsum dolor sit amet " * (MAX_BODY // 30)
    slow = threading.Thread(target=_post, args=(server, "/v1/completions", {"prompt": prompt}))
    slow.start()
    worst = 0.0
    while slow.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server}/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    slow.join()
    assert worst < 2.0, f"/health took {worst:.1f} s while a long prompt was tokenized"


def test_a_client_that_leaves_a_non_streamed_request_is_seen_to_leave(server):
    """With the old HTTP middleware, disconnects went unseen and the request counted as completed."""
    before = metric(server, 'fedattn_sessions_total{model_name="tiny-qwen2",outcome="cancelled"}')
    # The client gives up after 0.2 s, the request would take ~0.8 s here, and the server looks every 0.1 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", headers=HEADERS, timeout=0.2,
                   json={"model": MODEL, "prompt": [5] * 20, "max_tokens": 230, "ignore_eos": True})
    deadline = time.monotonic() + 20
    while metric(server, 'fedattn_sessions_total{model_name="tiny-qwen2",outcome="cancelled"}') <= before:
        assert time.monotonic() < deadline, "the abandoned request ran on"
        time.sleep(0.2)


def create(server, **body) -> httpx.Response:
    return _post(server, "/v1/fedattn/sessions", {"participants": 2, "max_tokens": 2, **body})


def wait_until_no_open_sessions(server) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/v1/fedattn/sessions", headers=HEADERS).json()["data"]:
        assert time.monotonic() < deadline, "open sessions did not expire"
        time.sleep(0.2)


def test_private_sessions_hold_session_slots_and_the_host_can_list_and_delete_them(server):
    wait_until_no_open_sessions(server)  # the matrix may have opened some (e.g. "participants": "3" is valid)
    sessions = [create(server).json() for _ in range(MAX_SESSIONS)]
    refused = create(server)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 429
    listed = httpx.get(f"{server}/v1/fedattn/sessions", headers=HEADERS).json()["data"]
    assert {s["id"] for s in sessions} <= {s["id"] for s in listed} and "token" not in str(listed)
    forged = httpx.delete(f"{server}/v1/fedattn/sessions/{sessions[0]['id']}",
                          headers={**HEADERS, "x-fedattn-host-token": "guess"})
    assert forged.status_code == 403
    with ThreadPoolExecutor(1) as pool:  # someone has joined the first: deleting it ends that join
        token = sessions[0]["participants"][0]["token"]
        joined = pool.submit(httpx.post, f"{server}/v1/fedattn/sessions/{sessions[0]['id']}/participants/0",
                             json={"token": token, "content": "x"}, headers=HEADERS, timeout=30)
        time.sleep(0.5)
        for s in sessions:
            deleted = httpx.delete(f"{server}/v1/fedattn/sessions/{s['id']}",
                                   headers={**HEADERS, "x-fedattn-host-token": s["host_token"]})
            assert deleted.status_code == 200
        assert joined.result().status_code == 409 and joined.result().json()["error"]["type"] == "cancelled_error"
    assert httpx.get(f"{server}/v1/fedattn/sessions", headers=HEADERS).json()["data"] == []
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_a_participant_that_leaves_before_the_start_ends_the_session_and_its_text_is_not_used(server):
    session = create(server, participants=2).json()
    url = f"{server}/v1/fedattn/sessions/{session['id']}/participants"
    with pytest.raises(httpx.ReadTimeout):  # participant 0 posts its part, then leaves
        httpx.post(f"{url}/0", json={"token": session["participants"][0]["token"], "content": "secret"},
                   headers=HEADERS, timeout=0.5)
    deadline = time.monotonic() + 10
    while session["id"] in {s["id"] for s in httpx.get(f"{server}/v1/fedattn/sessions", headers=HEADERS).json()["data"]}:
        assert time.monotonic() < deadline, "the session outlived a participant that left"
        time.sleep(0.2)
    late = httpx.post(f"{url}/1", json={"token": session["participants"][1]["token"], "content": "y"},
                      headers=HEADERS, timeout=30)
    assert late.status_code == 404
