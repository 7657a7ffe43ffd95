"""The OpenAI-compatible FedAttn server (`python -m server --help`), and `python -m server.invite` for a neutral host."""
