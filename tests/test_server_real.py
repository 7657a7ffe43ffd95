"""The server on the real default model (Qwen2.5-Coder-0.5B-Instruct, fp32) through the `openai` client."""

import openai
import pytest
from conftest import REAL_ENGINE_ARGS, federated_engine, greedy
from test_server import KEY, start_server

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.session import FedAttnSession
from fedattn_vllm.prompting import encode_segments

pytestmark = pytest.mark.slow

PARTIES = ["Alice's note: the meeting with the supplier is in Lisbon. ",
           "Bob's note: the meeting is on Thursday at 3 pm. ",
           "Question: in which city is the meeting with the supplier, and on which day? Answer briefly."]


def test_a_three_party_chat_on_the_real_model_equals_the_offline_api(tmp_path_factory):
    url, process, _ = start_server(tmp_path_factory, "--model", "default", "--max-model-len", "2048",
                                "--max-num-batched-tokens", "4096", "--kv-cache-gib", "0.5")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        reply = client.chat.completions.create(
            model="qwen2.5-coder-0.5b-instruct", messages=[], max_tokens=24, temperature=0,
            extra_body={"participants": PARTIES, "fedattn": {"sync_interval": 1, "kv_wire": "native"},
                        "ignore_eos": True})
    finally:
        process.terminate()
        process.wait(timeout=60)
    llm = federated_engine("default", **REAL_ENGINE_ARGS)
    prefix, segments = encode_segments(llm.tokenizer, PARTIES, chat=True)
    [expected] = llm.generate([FedAttnSession(segments, FedAttnConfig(sync_interval=1), greedy(24), public_prefix=prefix)])
    assert reply.choices[0].message.content == expected.outputs[2].text
    assert "Lisbon" in reply.choices[0].message.content  # H = 1 is centralised inference: the answer is there
    print(f"\nanswer: {reply.choices[0].message.content!r}")
