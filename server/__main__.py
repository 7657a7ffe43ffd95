"""`python -m server`: the OpenAI-compatible FedAttn server (flags: --help; env: FEDATTN_SERVER_*)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from fedattn_vllm.federated.lifeline import exit_with_parent
from server.app import build_app
from server.settings import ServerSettings


def parse(argv: list[str]) -> ServerSettings:
    """Settings from the command line: `python -m server [MODEL] [--flags]`, like `vllm serve`; a bad value
    exits 2 with one line per problem (no traceback)."""
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    try:
        return CliApp.run(ServerSettings, cli_args=argv)
    except ValidationError as error:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" if e["loc"]
                             else e["msg"] for e in error.errors())
        print(f"python -m server: error: {problems}", file=sys.stderr)
        raise SystemExit(2) from None
    except SettingsError as error:  # a value the command line parser cannot read (e.g. JSON that is not an object)
        print(f"python -m server: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    settings = parse(sys.argv[1:])
    if settings.parent_pid is not None:
        if settings.parent_pid != os.getppid():  # through a shim (uv run, timeout): the watch would end it at once
            print(f"python -m server: error: --parent-pid: {settings.parent_pid} is not this process's parent "
                  f"({os.getppid()})", file=sys.stderr)
            raise SystemExit(2)
        exit_with_parent(settings.parent_pid)
    logging.basicConfig(level=logging.INFO)
    # access_log off: request lines carry no prompt text, but nothing about a request is logged by default
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, access_log=False,
                ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile)


if __name__ == "__main__":
    main()
