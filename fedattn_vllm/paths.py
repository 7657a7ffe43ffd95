"""Where fedattn-vllm keeps its cached artefacts (models, downloaded wheels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FEDATTN_CACHE_DIR, else ~/.cache/fedattn-vllm."""
    return Path(os.environ.get("FEDATTN_CACHE_DIR") or Path.home() / ".cache" / "fedattn-vllm")


def models_dir() -> Path:
    return cache_dir() / "models"
