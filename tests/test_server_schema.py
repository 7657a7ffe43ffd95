"""Schemathesis against the real server (tiny model): requests generated from /openapi.json, valid and invalid, get
the statuses, content types and headers the schema declares, and never a 5xx. Bounded and deterministic.

Not checked: `positive_data_acceptance` (a schema-valid request answered 400): the server's rules across fields
and against its state (the served model's name, `top_logprobs` only with `logprobs`, max_model_len, a session's
join token) are not expressible in the schema, and each such refusal names its field."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import KEY, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, process, _ = start_server(tmp_path_factory)
    yield url
    process.terminate()
    process.wait(timeout=60)


def test_every_operation_answers_as_its_schema_declares(server, tmp_path):
    done = subprocess.run(  # in tmp_path: schemathesis keeps its state in ./.schemathesis
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json", "--max-examples", "5",
         "--generation-deterministic", "--header", f"Authorization: Bearer {KEY}",
         "--exclude-checks", "positive_data_acceptance", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Tested: 14" in done.stdout
