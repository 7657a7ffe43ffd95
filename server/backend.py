"""What serves the sessions: one in-process engine (colocated) or federated engine processes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from server.settings import ServerSettings
from server.worker import ClusterWorker, EngineWorker


@dataclass
class Backend:
    worker: object  # EngineWorker | ClusterWorker
    tokenizer: object
    num_layers: int
    sampling_defaults: dict  # the model's generation_config values of the SAMPLING_DEFAULTS fields
    metrics: object  # server.metrics.Metrics, told of every session's end
    local_cluster: object | None = None  # LocalCluster the server started, stopped with it

    @classmethod
    def start(cls, settings: ServerSettings, metrics) -> Backend:
        engine_args = settings.vllm_engine_args()
        limits = {"max_sessions": settings.max_sessions, "on_finished": metrics.session_finished}
        if not settings.engines and not settings.engine_endpoints and settings.role == "host":
            from fedattn_vllm.engine import FederatedLLM

            llm = FederatedLLM(settings.model, **engine_args)
            return cls(EngineWorker(llm, **limits), _with_chat_template(llm.tokenizer, settings), llm.num_layers,
                       sampling_defaults(llm.model_path), metrics)
        from transformers import AutoTokenizer

        from fedattn_vllm.federated.cluster import FederatedCluster
        from fedattn_vllm.federated.local import LocalCluster
        from fedattn_vllm.models import resolve_model

        local = None
        if settings.engine_endpoints:
            if not settings.coordinator:
                raise ValueError("--engine-endpoints needs --coordinator")
            keys = {name: os.environ.get(name) for name in ("FEDATTN_ADMIN_KEY", "FEDATTN_ENGINE_KEY")}
            if missing := [name for name, key in keys.items() if not key]:
                raise ValueError(f"--engine-endpoints needs the keys in the environment: set {', '.join(missing)}")
            cluster = FederatedCluster(settings.engine_endpoints, settings.coordinator,
                                       keys["FEDATTN_ADMIN_KEY"].encode(), control_key=keys["FEDATTN_ENGINE_KEY"].encode(),
                                       keys=None if settings.insecure else _orchestrator_keys(settings),
                                       insecure=settings.insecure, timeout_s=settings.session_timeout_s)
        elif settings.role == "party":  # this party's own engine; sessions opened with the admin key, if held
            admin_key = os.environ.get("FEDATTN_ADMIN_KEY")
            local = LocalCluster(settings.model, engines=1, engine_args=engine_args, timeout_s=settings.session_timeout_s,
                                 coordinator=(settings.coordinator, admin_key.encode() if admin_key else None),
                                 site=(settings.keypair, settings.coordinator_key))
            cluster = local.cluster
        else:
            local = LocalCluster(settings.model, engines=settings.engines, engine_args=engine_args,
                                 timeout_s=settings.session_timeout_s)
            cluster = local.cluster
        path = resolve_model(settings.model, settings.revision)
        return cls(ClusterWorker(cluster, **limits), _with_chat_template(AutoTokenizer.from_pretrained(path), settings),
                   cluster.num_layers, sampling_defaults(path), metrics, local)

    def close(self) -> None:
        self.worker.close()
        if self.local_cluster is not None:
            self.local_cluster.close()


def _orchestrator_keys(settings: ServerSettings):
    """The CURVE keys of --engine-endpoints: this server's keypair, the coordinator's and engines' public keys."""
    from fedattn_vllm.federated.curve import Keypair, OrchestratorKeys, public_key

    if settings.keypair is None or settings.coordinator_key is None:
        raise ValueError("--engine-endpoints encrypts its links: give --keypair and --coordinator-key "
                         "(or --insecure for plaintext on loopback)")
    if len(settings.engine_keys) != len(settings.engine_endpoints):
        raise ValueError(f"--engine-keys: {len(settings.engine_keys)} public keys for "
                         f"{len(settings.engine_endpoints)} --engine-endpoints (one each, in order)")
    return OrchestratorKeys(Keypair.load(settings.keypair), public_key(settings.coordinator_key),
                            tuple(public_key(path) for path in settings.engine_keys))


# The sampling fields vLLM's server takes from a model's generation_config (ModelConfig.get_diff_sampling_param)
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty")


def sampling_defaults(model_dir: str | Path) -> dict:
    """The sampling defaults a model ships in its generation_config.json (as vLLM's server applies them)."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {name: config[name] for name in SAMPLING_DEFAULTS if config.get(name) is not None}


def _with_chat_template(tokenizer, settings: ServerSettings):
    """The tokenizer, with --chat-template (a file's contents, or the template itself) replacing the model's."""
    if settings.chat_template is not None:
        path = Path(settings.chat_template).expanduser()
        try:
            is_file = path.is_file()
        except OSError:  # an inline template is rarely a valid path (a name part over 255 bytes)
            is_file = False
        tokenizer.chat_template = path.read_text() if is_file else settings.chat_template
    return tokenizer

