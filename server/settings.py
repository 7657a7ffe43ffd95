"""Server settings: command-line flags, environment (FEDATTN_SERVER_*) and an optional TOML file.

Precedence: flags > environment > the file named by FEDATTN_SERVER_CONFIG > defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


# vLLM engine arguments with a flag of their own, and those FedAttn fixes (the value it needs).
_FLAGGED = {"model": "--model", "revision": "--revision", "dtype": "--dtype", "max_model_len": "--max-model-len",
            "max_num_batched_tokens": "--max-num-batched-tokens", "kv_cache_memory_bytes": "--kv-cache-gib",
            "max_num_seqs": "--max-num-seqs", "gpu_memory_utilization": "--gpu-memory-utilization",
            "quantization": "--quantization", "tensor_parallel_size": "--tensor-parallel-size", "seed": "--seed"}
_SERVER_MANAGED = {"enable_prefix_caching": "False: each segment is computed whole",
                   "enable_chunked_prefill": "False: each segment is computed whole",
                   "hf_overrides": "its own architecture override", "pipeline_parallel_size": "1 (one process)",
                   "data_parallel_size": "1 (one process)", "tokenizer": "the model's own tokenizer",
                   "tokenizer_revision": "the model's own tokenizer", "skip_tokenizer_init": "the model's tokenizer"}


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDATTN_SERVER_", cli_prog_name="python -m server",
                                      cli_kebab_case=True, extra="forbid")

    model: str = Field("default", description="a local Hugging Face directory, one of ours (fedattn-models list; "
                       "'default'), or a Hugging Face Hub model: org/name, or a bare Qwen2/Llama name such as "
                       "Qwen2.5-7B-Instruct (HF_HOME, HF_HUB_OFFLINE honoured)")
    revision: str | None = Field(None, description="a Hub model's branch, tag or commit (default: its main branch)")
    served_model_name: str | None = Field(None, description="name clients use (default: --model as given, an alias "
                                          "as the name it stands for)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto, as in vLLM: the model's own (bfloat16 for Qwen2.5), float32 models "
        "at the device's preferred one (float32 is exact, and the fastest on CPUs without bf16)")
    max_model_len: int = Field(4096, ge=16, description="prompt + generated tokens per session")
    max_num_batched_tokens: int = Field(8192, ge=16, description="tokens one engine step may compute")
    kv_cache_gib: float = Field(2.0, gt=0, description="paged K/V cache size in GiB")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences one engine step may hold: every "
                                     "participant of every running session (vLLM's default if unset)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="GPU: the fraction of device memory "
                                                 "vLLM may use, instead of --kv-cache-gib (vLLM's default if unset)")
    quantization: str | None = Field(None, description="vLLM's weight quantization method (awq, gptq, fp8, ...)")
    tensor_parallel_size: int = Field(1, ge=1, description="devices (CPU: groups of cores) per engine: vLLM's "
                                      "tensor parallelism, each rank exchanging its own heads' K/V (docs/engine.md)")
    seed: int = Field(0, ge=0, lt=2**63, description="the engine's random seed (sampling without a request seed)")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="any other vLLM engine argument, as JSON "
                                        "(e.g. '{\"cpu_offload_gb\": 4, \"tokenizer_mode\": \"slow\"}'); those with a "
                                        "flag of their own are given by the flag")
    engines: int = Field(0, ge=0, description="0: one in-process engine (colocated); N: start N engine processes "
                         "on this machine, participant n of a session on engine n % N (federated)")
    role: Literal["host", "party"] = Field("host", description="host: this server runs every participant "
                                           "(one engine, --engines or --engine-endpoints); party: one party's own "
                                           "server and engine, joined to the others through --coordinator "
                                           "(docs/federated.md: party-side servers)")
    engine_endpoints: list[str] = Field(default_factory=list, description="attach to running federated engines "
                                        "(ZeroMQ endpoints; keys from FEDATTN_ADMIN_KEY / FEDATTN_ENGINE_KEY)")
    coordinator: str | None = Field(None, description="the coordinator of --engine-endpoints or --role party")
    keypair: Path | None = Field(None, description="--engine-endpoints, --role party: this server's (site's) CURVE "
                                 ".key_secret file (python -m fedattn_vllm.federated.curve new)")
    coordinator_key: Path | None = Field(None, description="--engine-endpoints, --role party: the coordinator's "
                                         "public key file")
    engine_keys: list[Path] = Field(default_factory=list, description="--engine-endpoints: each engine's public key "
                                    "file, in the same order")
    insecure: bool = Field(False, description="--engine-endpoints: plaintext ZeroMQ, no peer authentication "
                           "(loopback tests only); --engines N always encrypts with fresh keys")
    parent_pid: int | None = Field(None, ge=1, description="exit (as on SIGTERM) once this process, the server's "
                                   "direct parent, is gone: scripts and tests leave nothing behind")
    ssl_keyfile: Path | None = Field(None, description="serve HTTPS with this private key (PEM)")
    ssl_certfile: Path | None = Field(None, description="... and this certificate chain (PEM)")
    session_timeout_s: float = Field(60.0, gt=0, description="federated: how long a participant waits for a peer")
    allowed_origins: list[str] = Field(default_factory=list, description="CORS: origins browsers may call from "
                                       "(e.g. '[\"https://app.example\"]'; none by default)")
    chat_template: str | None = Field(None, description="a Jinja chat template, or a file holding one, instead of "
                                      "the model's")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on /v1 routes")
    max_participants: int = Field(16, ge=1, description="participants per multi-party request")
    max_sessions: int = Field(256, ge=1, description="sessions queued or running at once (then 429)")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest request body accepted (then 413)")
    log_requests: bool = Field(False, description="log each request's participant count and segment lengths (never text)")

    def vllm_engine_args(self) -> dict[str, Any]:
        """The vLLM engine arguments every engine of this server gets (the model is given apart)."""
        own = {"dtype": self.dtype, "max_model_len": self.max_model_len, "seed": self.seed,
               "max_num_batched_tokens": self.max_num_batched_tokens, "revision": self.revision,
               "max_num_seqs": self.max_num_seqs, "quantization": self.quantization,
               "tensor_parallel_size": self.tensor_parallel_size}
        if self.gpu_memory_utilization is None:
            own["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        else:
            own["gpu_memory_utilization"] = self.gpu_memory_utilization
        return {**self.engine_args, **{name: value for name, value in own.items() if value is not None}}

    @model_validator(mode="after")
    def _engine_args(self) -> ServerSettings:
        if not self.engine_args:
            return self
        from dataclasses import fields

        from vllm.engine.arg_utils import EngineArgs

        known = {f.name for f in fields(EngineArgs)}
        for name in self.engine_args:
            if name not in known:
                raise ValueError(f"--engine-args: {name!r} is not a vLLM engine argument")
            if name in _FLAGGED:
                raise ValueError(f"--engine-args: {name!r} is set by {_FLAGGED[name]}")
            if name in _SERVER_MANAGED:
                raise ValueError(f"--engine-args: {name!r} is the server's own (FedAttn needs {_SERVER_MANAGED[name]})")
        return self

    @property
    def served_name(self) -> str:
        from fedattn_vllm.models.registry import ALIASES

        return self.served_model_name or ALIASES.get(self.model, self.model)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
        return self

    @model_validator(mode="after")
    def _party(self) -> ServerSettings:
        if self.role != "party":
            return self
        if self.engines or self.engine_endpoints:
            raise ValueError("--role party runs this party's one engine itself: no --engines or --engine-endpoints")
        if not self.coordinator:
            raise ValueError("--role party needs --coordinator (the ZeroMQ endpoint every party joins)")
        if self.insecure or self.keypair is None or self.coordinator_key is None:
            raise ValueError("--role party needs --keypair and --coordinator-key, never --insecure: each participant "
                             "is bound to its site's CURVE key")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if path := os.environ.get("FEDATTN_SERVER_CONFIG"):
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)
