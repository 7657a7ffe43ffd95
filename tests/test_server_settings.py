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
