"""Server settings: flags over environment over a TOML file over defaults (pure logic)."""

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from server.settings import ServerSettings


def test_flags_override_environment_which_overrides_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "server.toml"
    config.write_text('port = 9100\nmax_participants = 4\napi_key = "from-file"\n')
    monkeypatch.setenv("FEDATTN_SERVER_CONFIG", str(config))
    monkeypatch.setenv("FEDATTN_SERVER_API_KEY", "from-env")
    settings = CliApp.run(ServerSettings, cli_args=["--max-participants", "8"])
    assert (settings.port, settings.api_key, settings.max_participants) == (9100, "from-env", 8)
    assert settings.model == "default" and settings.engines == 0 and not settings.log_requests


def test_bad_values_are_refused_naming_the_setting():
    with pytest.raises(ValidationError, match="port"):
        ServerSettings(port=70000)
    with pytest.raises(ValidationError, match="dtype"):
        ServerSettings(dtype="int3")


def test_https_needs_both_files():
    with pytest.raises(ValidationError, match="--ssl-keyfile and --ssl-certfile"):
        ServerSettings(ssl_keyfile="key.pem")


def test_attached_engines_need_curve_keys_unless_insecure(tmp_path):
    from fedattn_vllm.federated.curve import new_keypair
    from server.backend import _orchestrator_keys

    for name in ("server", "coordinator", "engine"):
        new_keypair(tmp_path, name)
    attach = {"engine_endpoints": ["tcp://a:5560", "tcp://b:5560"], "coordinator": "tcp://c:5557"}
    with pytest.raises(ValueError, match="--keypair and --coordinator-key"):
        _orchestrator_keys(ServerSettings(**attach))
    keyed = {**attach, "keypair": tmp_path / "server.key_secret", "coordinator_key": tmp_path / "coordinator.key"}
    with pytest.raises(ValueError, match="1 public keys for 2"):
        _orchestrator_keys(ServerSettings(**keyed, engine_keys=[tmp_path / "engine.key"]))
    keys = _orchestrator_keys(ServerSettings(**keyed, engine_keys=[tmp_path / "engine.key"] * 2))
    assert keys.engines[0] == keys.engines[1] != keys.coordinator


def test_the_command_line_takes_the_model_positionally_and_exits_2_on_bad_values(capsys):
    from server.__main__ import parse

    assert parse(["Qwen/Qwen2.5-7B", "--port", "9000"]).model == "Qwen/Qwen2.5-7B"
    assert parse(["--model", "tiny-qwen2"]).served_name == "tiny-qwen2"
    assert parse([]).served_name == "qwen2.5-coder-0.5b-instruct"  # an alias serves under the name it stands for
    with pytest.raises(SystemExit) as exit_:
        parse(["--port", "abc"])
    assert exit_.value.code == 2 and "--port: Input should be a valid integer" in capsys.readouterr().err


def test_a_chat_template_from_a_file_or_inline_replaces_the_models(tmp_path):
    from types import SimpleNamespace

    from server.backend import _with_chat_template

    template = "{% for m in messages %}[{{ m.content }}]{% endfor %}" + "{# a long inline template #}" * 12  # > 255 B
    (tmp_path / "t.jinja").write_text(template)
    for given in (str(tmp_path / "t.jinja"), template):
        tokenizer = _with_chat_template(SimpleNamespace(chat_template="model's"), ServerSettings(chat_template=given))
        assert tokenizer.chat_template == template
    assert _with_chat_template(SimpleNamespace(chat_template="model's"), ServerSettings()).chat_template == "model's"



def test_engine_arguments_pass_through_to_vllm_and_what_fedattn_fixes_is_refused(capsys):
    from server.__main__ import parse

    settings = parse(["tiny-qwen2", "--max-num-seqs", "8", "--seed", "7", "--quantization", "fp8",
                      "--engine-args", '{"tokenizer_mode": "slow", "enforce_eager": true}'])
    assert settings.vllm_engine_args() == {
        "tokenizer_mode": "slow", "enforce_eager": True, "dtype": "auto", "max_model_len": 4096, "seed": 7,
        "max_num_batched_tokens": 8192, "max_num_seqs": 8, "quantization": "fp8", "kv_cache_memory_bytes": 2 << 30,
        "tensor_parallel_size": 1}
    gpu = parse(["--gpu-memory-utilization", "0.8"]).vllm_engine_args()
    assert gpu["gpu_memory_utilization"] == 0.8 and "kv_cache_memory_bytes" not in gpu
    assert parse(["--tensor-parallel-size", "2", "--engines", "2"]).vllm_engine_args()["tensor_parallel_size"] == 2
    refused = {("--tensor-parallel-size", "0"): "--tensor-parallel-size",
               ("--engine-args", '{"bogus": 1}'): "'bogus' is not a vLLM engine argument",
               ("--engine-args", '{"dtype": "float16"}'): "'dtype' is set by --dtype",
               ("--engine-args", '{"enable_chunked_prefill": true}'): "FedAttn needs False",
               ("--engine-args", '{"tokenizer": "other"}'): "the model's own tokenizer",
               ("--engine-args", "[1]"): "engine_args",
               ("--seed", str(2**63)): "--seed"}
    for argv, message in refused.items():
        with pytest.raises(SystemExit) as exit_:
            parse(list(argv))
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and message in error and "Traceback" not in error, error
