"""The vLLM plugin: declared as an entry point, loaded by vLLM, idempotent and cheap."""

import subprocess
import sys
from importlib.metadata import entry_points

from fedattn_vllm.plugin import FEDATTN_ARCHITECTURES


def test_the_entry_point_is_declared():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins["fedattn"] == "fedattn_vllm.plugin:register"


def test_vllm_loads_it_idempotently_without_importing_the_model_classes():
    script = f"""
import sys
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins
load_general_plugins()
from fedattn_vllm.plugin import register
register(); register()
assert {sorted(FEDATTN_ARCHITECTURES.values())!r} == sorted(
    a for a in ModelRegistry.get_supported_archs() if a.startswith("FedAttn"))
assert "fedattn_vllm.vllm_ext.models" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
