"""`python -m fedattn_vllm.models`: provision models into the cache, or print where they are."""

from __future__ import annotations

import argparse
import logging
import sys

from fedattn_vllm.models import KNOWN_MODELS, ModelProvisionError, is_provisioned, provision
from fedattn_vllm.models.registry import ALIASES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedattn_vllm.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_prov = sub.add_parser("provision", help="build models into the cache (skips those already there)")
    p_prov.add_argument("names", nargs="+", help=f"any of {', '.join(KNOWN_MODELS)}, or {', '.join(ALIASES)}")
    p_prov.add_argument("--force", action="store_true", help="rebuild even if cached")
    sub.add_parser("list", help="known models and whether each is provisioned")
    p_path = sub.add_parser("path", help="print a model's directory, provisioning it if needed")
    p_path.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "provision":
            for name in args.names:
                print(provision(name, force=args.force))
        elif args.command == "list":
            for name in KNOWN_MODELS:
                print(f"{name}\t{'provisioned' if is_provisioned(name) else 'not provisioned'}")
        else:
            print(provision(args.name))
    except ModelProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
