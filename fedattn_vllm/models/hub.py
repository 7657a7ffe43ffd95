"""Models from the Hugging Face Hub, named as vLLM users name them.

A hub id (`Qwen/Qwen2.5-7B-Instruct`) is fetched with `huggingface_hub.snapshot_download`
into the Hub cache (`HF_HUB_CACHE`, else `HF_HOME`/hub), offline from that cache when
`HF_HUB_OFFLINE=1`. A bare name of a family we run gets its organisation from `HUB_ORGS`
(`Qwen2.5-7B` -> `Qwen/Qwen2.5-7B`). The environment is read at every call, not at import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ORGS = {  # a bare model name's prefix -> its organisation on the Hub (the families FedAttn runs: Qwen2, Llama)
    "Qwen2.5-": "Qwen",
    "Qwen2-": "Qwen",
    "Llama-": "meta-llama",
    "Meta-Llama-": "meta-llama",
    "SmolLM2-": "HuggingFaceTB",
    "SmolLM-": "HuggingFaceTB",
}
# What a model needs: config, weights, tokenizer (never other repositories' extras: GGUF, ONNX, ...).
WANTED_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubModelError(LookupError):
    """A hub model that could not be found or fetched; the message says what was tried."""


def hub_id(name: str) -> str | None:
    """`org/name` for a hub id or a bare name of a known family; None for anything else."""
    if _HUB_ID.match(name):
        return name
    if "/" not in name:
        for prefix, org in HUB_ORGS.items():
            if name.startswith(prefix):
                return f"{org}/{name}"
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (the default branch unless given)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache(), local_files_only=offline(),
                                      allow_patterns=WANTED_FILES))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE is set, so only the cache was searched: download it where the Hub is reachable "
               f"(huggingface-cli download {repo_id}) into {hub_cache()}, or give a local directory"
               if offline() else "the Hub could not be reached and the cache does not hold it")
        raise HubModelError(f"{repo_id}{at} is not in the Hugging Face cache {hub_cache()}; {how}") from None
    except (HfHubHTTPError, HFValidationError, OSError) as error:
        raise HubModelError(f"{repo_id}{at} could not be fetched from the Hugging Face Hub "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
