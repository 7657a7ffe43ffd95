"""Shared fixtures: seeded torch, tiny random models (fast), the real default model (slow), vLLM engines.

Engines are expensive to start, so each is built once per test run and shared.
"""

from __future__ import annotations

import functools
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # test engines run in this process

import pytest
import torch
from transformers.utils import logging as hf_logging

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.federated.coordinator import Coordinator
from fedattn_vllm.federated.wire import decode
from fedattn_vllm.models import resolve_model
from fedattn_vllm.schedule import Placement

hf_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_hf(name: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session", params=["tiny-qwen2", "tiny-llama"])
def tiny(request):
    """(model, tokenizer) of each tiny random architecture, fp32."""
    return load_hf(request.param)


@pytest.fixture(scope="session")
def real_model():
    """The default real model (Qwen2.5-Coder-0.5B-Instruct), fp32."""
    return load_hf("default")


# Tiny engines: a budget smaller than a batch of sessions, so admission mixes prefill and decode.
# Small K/V caches: a test run holds several engines at once (in this process and in cluster processes).
TINY_ENGINE_ARGS = {"dtype": "float32", "max_model_len": 256, "max_num_batched_tokens": 256, "seed": 0,
                    "kv_cache_memory_bytes": 64 << 20}
# The real default model, fp32, as the slow tests run it (one engine, shared by them).
REAL_ENGINE_ARGS = {"dtype": "float32", "max_model_len": 2048, "max_num_batched_tokens": 16384, "seed": 0,
                    "kv_cache_memory_bytes": 512 << 20}


# The server as a real process (tests/test_server*.py): the tiny model, an API key.
MODEL, KEY = "tiny-qwen2", "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


SERVER_FLAGS = ("--dtype", "float32", "--max-model-len", "256", "--max-num-batched-tokens", "256", "--kv-cache-gib",
                "0.0625")  # the server sized for the tiny test models


def server_command(port: int, *flags: str, model: str = MODEL) -> list[str]:
    """`python -m server MODEL` on `port` (later flags override)."""
    import sys

    return [sys.executable, "-m", "server", model, "--port", str(port), *SERVER_FLAGS, *flags]


@contextmanager
def in_process_server(*flags: str, model: str = MODEL):
    """The server's app in this process, its lifespan starting and stopping the engine, as an httpx client with no
    socket (Starlette's TestClient: `.get`, `.post`, `.stream` on paths; `.portal` runs coroutines on its loop)."""
    from starlette.testclient import TestClient

    from server.__main__ import parse
    from server.app import build_app

    app = build_app(parse([model, *SERVER_FLAGS, "--api-key", KEY, *flags]))
    with TestClient(app, base_url="http://fedattn") as client:
        client.app = app
        yield client


def start_server(tmp_path_factory, *flags: str, model: str = MODEL):
    """`python -m server MODEL` (the tiny model; later flags override), ready to serve: (url, process, log path)."""
    import subprocess
    import sys

    from fedattn_vllm.federated.local import free_port
    from server.launch import wait_until_healthy

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = server_command(port, "--api-key", KEY, "--parent-pid", str(os.getpid()), *flags, model=model)
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, process, log, timeout_s=180)
    return url, process, log


def metric(server, name: str) -> float:
    """A sample's value from the server's /metrics by its exact name and labels (0 if absent); `server`: its URL,
    or a client on it."""
    import httpx

    reply = httpx.get(f"{server}/metrics") if isinstance(server, str) else server.get("/metrics")
    for line in reply.text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def assert_nothing_held(url: str, deadline_s: float = 30) -> dict:
    """GET /v1/fedattn/status until no engine and not the coordinator holds anything of any session."""
    import time

    import httpx

    deadline = time.monotonic() + deadline_s
    while True:
        reply = httpx.get(f"{url}/v1/fedattn/status", headers=HEADERS, timeout=60)
        if reply.status_code != 200:  # the engine thread was too busy to answer: ask again
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.5)
            continue
        status = reply.json()
        held = [{k: v for k, v in engine.items() if k != "dropped" and v} for engine in status["engines"]]
        if "coordinator" in status:  # federated; an error there counts as holding (-1)
            held.append({k: status["coordinator"].get(k, -1) for k in ("sessions", "waiters", "stored_bytes")
                         if status["coordinator"].get(k, -1)})
        if not any(held) and status["open_sessions"] == 0:
            return status
        assert time.monotonic() < deadline, f"left behind: {held}"
        time.sleep(0.5)


@functools.cache
def federated_engine(name: str, **engine_args):
    from fedattn_vllm.engine import FederatedLLM

    return FederatedLLM(name, **(engine_args or TINY_ENGINE_ARGS))


@functools.cache
def plain_engine(name: str, **engine_args):
    """Stock vLLM (the model's own architecture) with the same engine arguments."""
    from vllm import LLM

    args = {"enforce_eager": True, **(engine_args or TINY_ENGINE_ARGS)}
    return LLM(model=str(resolve_model(name)), **args)


@pytest.fixture(scope="session", params=["tiny-qwen2", "tiny-llama"])
def tiny_engine(request):
    """A FedAttn vLLM engine on a tiny random model, with its HF twin's oracle (fp32)."""
    from fedattn_vllm.oracle import FedAttnOracle

    model, tokenizer = load_hf(request.param)
    return SimpleNamespace(name=request.param, llm=federated_engine(request.param),
                           oracle=FedAttnOracle(model), hf=model, tokenizer=tokenizer)


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def random_tokens(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


@dataclass(frozen=True)
class Case:
    """One randomised session of the grid."""

    segments: list[list[int]]
    prefix: list[int]  # public prefix token ids ([] for none)
    config: FedAttnConfig
    max_tokens: int

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.segments]

    def session(self):
        from fedattn_vllm.session import FedAttnSession

        return FedAttnSession(self.segments, self.config, greedy(self.max_tokens), public_prefix=self.prefix)

    def __str__(self) -> str:
        return f"prefix={len(self.prefix)} lengths={self.lengths} {self.config}"


def random_case(rng: random.Random, vocab: int, num_layers: int, wires: tuple[KVWire, ...] = (KVWire.NATIVE,),
                selections: tuple[str, ...] = ("random", "key_norm")) -> Case:
    """Segments, public prefix, config and max_tokens for one randomised session of the grid."""
    n = rng.randint(1, 4)
    lengths = [rng.choice([1, 2, rng.randint(1, 12), rng.randint(10, 40)]) for _ in range(n)]
    placement = rng.choice(list(Placement))
    options: dict = {"placement": placement, "sync_interval": rng.randint(1, 4), "seed": rng.randrange(1000)}
    if placement is Placement.EXPLICIT:
        options["sync_layers"] = rng.sample(range(num_layers), rng.randint(0, num_layers))
    elif rng.random() < 0.3:
        options["publisher_sync_interval"] = rng.randint(1, 3)
        options["publisher"] = rng.randrange(-n, n)
    if rng.random() < 0.4:
        options["generator_sync_interval"] = rng.randint(1, 3)
    ratio = rng.choice(["dense", "global", "per participant"])
    if ratio == "global":
        options["kv_share_ratio"] = rng.choice([0.1, 0.3, 0.5, 0.75])
    elif ratio == "per participant":
        options["kv_share_ratio"] = tuple(rng.choice([0.2, 0.5, 1.0]) for _ in range(n))
    if ratio != "dense":
        options["kv_selection"] = rng.choice(selections)
    options["generators"] = tuple(rng.sample(range(n), rng.randint(1, n)))
    if "question" not in selections and rng.random() < 0.3:  # sparse local computation (not with question selection)
        options["local_keep_ratio"] = rng.choice([0.3, 0.5, 0.9])
        options.setdefault("kv_selection", rng.choice(selections))
    if len(wires) > 1:
        options["kv_wire"] = rng.choice(wires)
    prefix = random_tokens(rng, vocab, rng.choice([1, rng.randint(2, 12)])) if rng.random() < 0.4 else []
    # At least two tokens, so every generator decodes once and reads everyone's K/V (as the cost model counts).
    return Case([random_tokens(rng, vocab, length) for length in lengths], prefix, FedAttnConfig(**options),
                rng.randint(2, 10))


def make_hub_cache(home, monkeypatch):
    """A Hugging Face cache under `home` (set as HF_HOME, offline) holding the tiny model as Qwen/Qwen2.5-Tiny:
    its main branch a base model (no chat template) sampling greedily by default (generation_config), tag v1 the
    tiny model as it is; returns the repository's cache folder."""
    from fedattn_vllm.models.tiny import build_tiny_model

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = home / "hub" / "models--Qwen--Qwen2.5-Tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        build_tiny_model("tiny-qwen2", repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    main = repo / "snapshots" / ("a" * 40)
    (main / "chat_template.jinja").unlink()
    (main / "generation_config.json").write_text('{"temperature": 0.0, "top_k": 1}')  # greedy unless asked otherwise
    return repo


class RecordingCoordinator(Coordinator):
    """The real coordinator, keeping a copy of every message it receives and of every reply it sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: list[tuple[dict, bytes]] = []  # (header, all frames' bytes)
        self.sent: list[bytes] = []  # each reply's frames' bytes

    def _process(self, identity, request_id, message):
        self.received.append((decode(message)[0], _joined(message)))
        super()._process(identity, request_id, message)

    def _reply(self, identity, request_id, frames):
        self.sent.append(_joined(frames))
        super()._reply(identity, request_id, frames)


def _joined(frames) -> bytes:
    return b"".join(bytes(memoryview(f.buffer if hasattr(f, "buffer") else f)) for f in frames)
