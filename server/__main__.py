"""`python -m server`: the OpenAI-compatible FedAttn server (flags: --help; env: FEDATTN_SERVER_*)."""

from __future__ import annotations

import logging

import uvicorn
from pydantic_settings import CliApp

from server.app import create_app
from server.settings import ServerSettings


def main() -> None:
    settings = CliApp.run(ServerSettings)
    logging.basicConfig(level=logging.INFO)
    # access_log off: request lines carry no prompt text, but nothing about a request is logged by default
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False,
                ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile)


if __name__ == "__main__":
    main()
