"""The server in-process: `build_app(settings, backend)` on the tiny engine, requests through httpx.ASGITransport
(no socket, no process): answers equal to the offline API, errors as values in the OpenAI shape, streams through
the `openai` client. The real-process tests (test_server*.py) keep the CLI, signals and the network."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import HEADERS, KEY, MODEL, federated_engine, greedy

from fedattn_vllm.session import FedAttnSession
from server.__main__ import parse
from server.app import build_app
from server.backend import Backend
from server.errors import APIError
from server.metrics import Metrics
from server.schemas import FedAttnBlock

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def app():
    settings = parse([MODEL, "--dtype", "float32", "--max-model-len", "256", "--max-num-batched-tokens", "256",
                      "--kv-cache-gib", "0.0625", "--api-key", KEY])
    backend = Backend.start(settings, Metrics(settings.served_name))
    app = build_app(settings, backend)
    yield app
    app.state.serving.close()
    backend.close()


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fedattn", headers=HEADERS,
                             timeout=60)


async def test_models_version_and_a_tokenize_round_trip(app):
    async with client(app) as http:
        assert (await http.get("/v1/models")).json()["data"][0]["id"] == MODEL
        assert (await http.get(f"/v1/models/{MODEL}")).json()["max_model_len"] == 256
        assert set((await http.get("/version")).json()) == {"version", "vllm"}
        tokens = (await http.post("/tokenize", json={"model": MODEL, "prompt": "the door code"})).json()["tokens"]
        text = (await http.post("/detokenize", json={"model": MODEL, "tokens": tokens})).json()["prompt"]
    assert text == "the door code"


async def test_a_multi_party_completion_equals_the_offline_api(app):
    parts = [list(range(10, 30)), list(range(100, 107)), list(range(200, 240))]
    async with client(app) as http:
        reply = (await http.post("/v1/completions", json={"model": MODEL, "participants": parts, "max_tokens": 6,
                                                          "temperature": 0, "ignore_eos": True})).json()
    [expected] = federated_engine(MODEL).generate([FedAttnSession(parts, FedAttnBlock().to_config(), greedy(6))])
    assert [c["text"] for c in reply["choices"]] == [o.text for o in expected.outputs.values()]
    assert reply["fedattn"]["published_bytes"] == expected.cost.published_bytes
    assert reply["usage"]["prompt_tokens"] == 67 and reply["usage"]["completion_tokens"] == 6


async def test_errors_are_values_of_the_serving_layer_and_the_openai_shape_on_the_wire(app):
    refused = await app.state.serving.model_named("other")
    assert isinstance(refused, APIError) and (refused.status, refused.param) == (404, "model")
    async with client(app) as http:
        reply = await http.post("/v1/completions", json={"model": MODEL, "participants": ["a"] * 99})
        unauthenticated = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert reply.status_code == 400 and reply.json()["error"] == {
        "message": "99 participants exceed max_participants=16", "type": "invalid_request_error",
        "param": "participants", "code": 400}
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == 401


async def test_the_openai_clients_stream_helper_reads_a_multi_party_chat(app):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=60)
    api = openai.AsyncOpenAI(base_url="http://fedattn/v1", api_key=KEY, http_client=http)
    async with api.chat.completions.stream(
            model=MODEL, messages=[], max_tokens=5, temperature=0,
            extra_body={"participants": ["alice: the code is 4417. ", "bob: the code?"], "ignore_eos": True},
            stream_options={"include_usage": True}) as stream:
        await stream.until_done()
        final = stream.current_completion_snapshot  # (get_final_completion refuses finish_reason "length")
    await http.aclose()
    assert final.choices[0].finish_reason == "length" and final.usage.completion_tokens == 5
    async with client(app) as metrics_client:
        metrics = (await metrics_client.get("/metrics")).text
    assert f'fedattn_sessions_total{{model_name="{MODEL}",outcome="completed"}}' in metrics
