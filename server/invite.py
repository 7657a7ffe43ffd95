"""Sessions across party-side servers, opened by a neutral host: no engine, no text, no party's credential.

    FEDATTN_ADMIN_KEY=... python -m server.invite --coordinator tcp://coord:5557 \\
        --keypair keys/host.key_secret --coordinator-key keys/coordinator.key \\
        --site keys/a.key --site keys/b.key --site keys/c.key \\
        --terms '{"chat": true, "max_tokens": 64, "temperature": 0, "fedattn": {"sync_interval": 2}}'

opens a session at the coordinator with participant n bound to the n-th `--site` public key
and prints what a party server's `POST /v1/fedattn/sessions` answers: the session id, its
generators and the invitation (the terms, and a fresh key that seals K/V past the
coordinator). Hand the invitation to the parties; each party's client joins at its own server
with it (docs/federated.md, Party-side servers). The host's key must be in the coordinator's
trust directory; the host learns nothing a party posts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

from fedattn_vllm.config import FedAttnPlan
from fedattn_vllm.federated.client import CoordinatorError
from fedattn_vllm.federated.curve import ClientCurve, Keypair, public_key
from fedattn_vllm.federated.party import open_session
from fedattn_vllm.federated.sealing import new_seal_key
from server.schemas import FedAttnBlock, Invitation, SessionCreateRequest


def created(session_id: str, terms: SessionCreateRequest, plan: FedAttnPlan) -> dict:
    """The answer to a created party-side session: its id, generators and a fresh invitation."""
    invitation = Invitation(session=session_id, terms=terms, seal_key=base64.b64encode(new_seal_key()).decode())
    return {"id": session_id, "object": "fedattn.session", "generators": list(plan.generators),
            "join_timeout_s": terms.join_timeout_s,
            "invitation": invitation.model_dump(mode="json", exclude_unset=True)}  # the terms as their creator set them


def _num_layers(model: str, revision: str | None) -> int:
    from transformers import AutoConfig

    from fedattn_vllm.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model, revision)).num_hidden_layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.invite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", required=True, help="the coordinator's ZeroMQ endpoint")
    parser.add_argument("--keypair", type=Path, required=True, help="this host's CURVE .key_secret file")
    parser.add_argument("--coordinator-key", type=Path, required=True, help="the coordinator's public key file")
    parser.add_argument("--site", type=Path, action="append", required=True,
                        help="participant n's site: its public key file (repeat, in participant order)")
    parser.add_argument("--model", default="default", help="the model every site serves (its depth sizes the plan)")
    parser.add_argument("--revision")
    parser.add_argument("--terms", default="{}", help="JSON: the session's fields of POST /v1/fedattn/sessions "
                        "(chat, system or public_prefix, sampling, fedattn, join_timeout_s)")
    args = parser.parse_args(argv)
    admin_key = os.environ.get("FEDATTN_ADMIN_KEY")
    if not admin_key:
        parser.error("set FEDATTN_ADMIN_KEY (the coordinator's secret for opening sessions)")
    if len(args.site) < 2:
        parser.error("--site: at least two participants")
    try:
        sites = [public_key(path).decode() for path in args.site]
        curve = ClientCurve(Keypair.load(args.keypair), public_key(args.coordinator_key))
        terms = SessionCreateRequest(**{**json.loads(args.terms), "model": args.model, "participants": len(sites),
                                        "sites": sites})
        if (broken := terms.contradiction(party=True)) is not None:
            parser.error(f"--terms: {broken[1]}")
        plan = (terms.fedattn or FedAttnBlock()).to_config().resolve(_num_layers(args.model, args.revision),
                                                                     len(sites))
    except ValueError as error:  # key files, JSON, the terms' fields, the settings
        parser.error(str(error))
    try:
        session_id = open_session(args.coordinator, admin_key.encode(), curve, [s.encode() for s in sites], plan)
    except CoordinatorError as error:
        sys.exit(f"the coordinator refused: {error}")
    print(json.dumps(created(session_id, terms, plan), indent=2))


if __name__ == "__main__":
    main()
