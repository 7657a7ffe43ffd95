import hashlib
import json

import pytest
from conftest import make_hub_cache

from fedattn_vllm.models import ModelProvisionError, canonical_name, resolve_model
from fedattn_vllm.models.gguf_build import assemble_gguf
from fedattn_vllm.models.registry import REAL_MODELS, GgufPackageModel
from fedattn_vllm.models.tiny import build_tiny_model


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_tiny_models_are_deterministic(tmp_path, name):
    build_tiny_model(name, tmp_path / "a")
    build_tiny_model(name, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["head_dim"] == 64 and config["num_key_value_heads"] == 1 and config["vocab_size"] == 512


def test_unknown_model_names_are_rejected():
    with pytest.raises(ModelProvisionError, match="'gpt-9' is not a local directory, not one of ours .*not a Hub id"):
        resolve_model("gpt-9")
    with pytest.raises(ModelProvisionError, match="unknown model 'gpt-9'"):
        canonical_name("gpt-9")
    assert canonical_name("default") == "qwen2.5-coder-0.5b-instruct"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    return make_hub_cache(tmp_path / "hf", monkeypatch)


def test_hub_ids_and_bare_names_resolve_from_the_cache_offline(hub_cache):
    main, tag = hub_cache / "snapshots" / ("a" * 40), hub_cache / "snapshots" / ("b" * 40)
    assert resolve_model("Qwen/Qwen2.5-Tiny") == main
    assert resolve_model("Qwen2.5-Tiny") == main  # the organisation from the family's name
    assert resolve_model("Qwen/Qwen2.5-Tiny", revision="v1") == tag
    assert (main / "config.json").is_file()


def test_a_hub_model_missing_offline_says_what_was_tried(hub_cache):
    with pytest.raises(ModelProvisionError, match="Qwen/Qwen2.5-7B is not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        resolve_model("Qwen2.5-7B")
    with pytest.raises(ModelProvisionError, match="'qwen2.5-coder-0.5b-instruct' is provisioned from a quantised GGUF"):
        resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    with pytest.raises(ModelProvisionError, match="revision nope"):
        resolve_model("Qwen/Qwen2.5-Tiny", revision="nope")


def test_local_directories_pass_through(tmp_path):
    assert resolve_model(tmp_path) == tmp_path


def test_every_real_model_pins_its_packages_and_checksum():
    for spec in REAL_MODELS.values():
        assert all("==" in req for req, _ in spec.wheels) and len(spec.sha256) == 64 and spec.size > 0


def test_a_missing_package_gives_a_clear_error(tmp_path):
    spec = GgufPackageModel("ghost", (("fedattn-no-such-package-x7q==0.0.1", "x.bin"),), "0" * 64, 1, "qwen2", "")
    with pytest.raises(ModelProvisionError, match="cannot download fedattn-no-such-package-x7q==0.0.1"):
        assemble_gguf(spec, tmp_path / "ghost.gguf")


def test_a_checksum_mismatch_is_refused(tmp_path):
    spec = GgufPackageModel("six", (("six==1.16.0", "six.py"),), "0" * 64, 1, "qwen2", "")
    with pytest.raises(ModelProvisionError, match="checksum mismatch"):
        assemble_gguf(spec, tmp_path / "six.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-built is left behind
