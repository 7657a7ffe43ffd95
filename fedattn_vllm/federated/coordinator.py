"""The coordinator: relays sync-layer K/V between the engines of federated sessions.

It never sees text or token ids, only K/V tensors, and hands each participant only what
the spec lets it see. Sessions are opened by the orchestrator (admin key), which gets one
credential per participant; an engine presents its participant's credential with every
publish or fetch. A fetch of K/V not yet published waits (pipelined prefill) until it is
published or the caller's deadline passes. Sessions are freed when closed, or when idle
longer than `session_ttl_s` (an orchestrator that died leaves nothing behind).

    python -m fedattn_vllm.federated.coordinator --bind tcp://127.0.0.1:5557
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError, FedAttnPlan
from fedattn_vllm.exchange import kv_nbytes
from fedattn_vllm.federated.wire import Tensors, WireError, decode, encode, message_bytes

log = logging.getLogger(__name__)
MAX_WAIT_S = 600.0
MAX_SIZE = 4096  # bound on a session's layers and participants (a header from outside is range-checked)


class Refused(Exception):
    """A request the coordinator answers with an error (`code` says which kind)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    plan: FedAttnPlan  # who publishes where and who may see whom: the plan's own rule
    credentials: list[bytes]
    kv: dict[tuple[int, int], Tensors] = field(default_factory=dict)  # (participant, layer) -> K/V
    # (participant, "up" | "down") -> bytes on the wire; payload bytes (K/V only) likewise
    wire_bytes: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    payload_bytes: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Waiter:
    identity: bytes
    request_id: bytes
    session_id: str
    viewer: int
    source: int
    layer: int
    deadline: float


class Coordinator:
    """Runs on one ROUTER socket; `serve_forever` in a thread or its own process."""

    def __init__(self, bind: str, admin_key: bytes, *, session_ttl_s: float = 600.0):
        self.admin_key = admin_key
        self.session_ttl_s = session_ttl_s
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(bind)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sessions: dict[str, Session] = {}
        self._waiters: list[_Waiter] = []
        self._stop = threading.Event()

    # -- the loop ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(timeout=self._poll_ms()):
                    identity, request_id, *frames = self._socket.recv_multipart(copy=False)
                    self._handle(identity.bytes, request_id.bytes, frames)
                self._expire()
        finally:
            self._socket.close(0)
            self._context.term()

    def stop(self) -> None:
        self._stop.set()

    def _poll_ms(self) -> int:
        if not self._waiters:
            return 100
        return max(0, min(100, int(1000 * (min(w.deadline for w in self._waiters) - time.monotonic())) + 1))

    def _reply(self, identity: bytes, request_id: bytes, frames: list) -> None:
        self._socket.send_multipart([identity, request_id, *frames], copy=False)

    def _error(self, identity: bytes, request_id: bytes, code: str, message: str) -> None:
        self._reply(identity, request_id, encode({"ok": False, "code": code, "error": message}))

    def _handle(self, identity: bytes, request_id: bytes, frames: list) -> None:
        try:
            header, kv = decode(frames)
            op = header.get("op")
            handler = {"open": self._open, "close": self._close, "stats": self._stats,
                       "publish": self._publish, "fetch": self._fetch}.get(op)
            if handler is None:
                raise Refused("bad_request", f"unknown op {op!r}")
            reply = handler(header, kv, identity, request_id, message_bytes(frames))
        except WireError as error:
            self._error(identity, request_id, "bad_request", str(error))
        except Refused as error:
            self._error(identity, request_id, error.code, str(error))
        except (KeyError, TypeError, ValueError) as error:
            self._error(identity, request_id, "bad_request", f"malformed request: {error!r}")
        else:
            if reply is not None:
                self._reply(identity, request_id, reply)

    # -- admin -----------------------------------------------------------------------------
    def _admin(self, header: dict) -> None:
        if not hmac.compare_digest(bytes(header.get("admin_key", b"")), self.admin_key):
            raise Refused("forbidden", "admin key required")

    def _open(self, header: dict, kv, *_):
        self._admin(header)
        session_id = str(header["session"])
        if session_id in self.sessions:
            raise Refused("conflict", f"session {session_id} already exists")
        config, num_layers, n = header["config"], header["num_layers"], header["num_participants"]
        if not isinstance(config, dict) or not all(isinstance(v, int) and 1 <= v <= MAX_SIZE for v in (num_layers, n)):
            raise Refused("bad_request", f"a session needs a config, and num_layers and num_participants in 1..{MAX_SIZE}")
        try:
            plan = FedAttnConfig(**config).resolve(num_layers, n)
            if plan.selection_needs_queries:
                raise FedAttnConfigError("kv_selection", "'question' needs the generators' queries at every layer, "
                                         "which federated mode does not carry yet (colocated only)")
        except FedAttnConfigError as error:
            raise Refused("bad_request", f"config.{error}") from None
        credentials = [secrets.token_bytes(16) for _ in range(n)]
        self.sessions[session_id] = Session(plan, credentials)
        return encode({"ok": True, "credentials": credentials})

    def _close(self, header: dict, *_):
        self._admin(header)
        self._drop(str(header["session"]), "closed")
        return encode({"ok": True})

    def _stats(self, header: dict, *_):
        self._admin(header)
        session = self._session(header)
        return encode({"ok": True, "wire_bytes": _by_participant(session.wire_bytes),
                       "payload_bytes": _by_participant(session.payload_bytes)})

    # -- participants ---------------------------------------------------------------------
    def _session(self, header: dict) -> Session:
        session = self.sessions.get(str(header["session"]))
        if session is None:
            raise Refused("unknown_session", f"no session {header['session']} (never opened, closed or expired)")
        session.last_used = time.monotonic()
        return session

    def _authenticated(self, header: dict) -> tuple[Session, int]:
        session = self._session(header)
        participant = int(header["participant"])
        if not 0 <= participant < len(session.credentials) or not hmac.compare_digest(
            bytes(header.get("credential", b"")), session.credentials[participant]
        ):
            raise Refused("forbidden", f"bad credential for participant {participant}")
        return session, participant

    def _publish(self, header: dict, kv: Tensors | None, identity, request_id, size: int):
        session, n = self._authenticated(header)
        layer = int(header["layer"])
        if kv is None:
            raise Refused("bad_request", "publish carries K and V frames")
        if not session.plan.publishes(n, layer):
            raise Refused("forbidden", f"participant {n} does not share at layer {layer}")
        if (n, layer) in session.kv:
            raise Refused("conflict", f"participant {n} already published layer {layer}")
        session.kv[n, layer] = kv
        session.wire_bytes[n, "up"] += size
        session.payload_bytes[n, "up"] += kv_nbytes(kv)
        self._wake(str(header["session"]), n, layer)
        return encode({"ok": True})

    def _fetch(self, header: dict, kv, identity: bytes, request_id: bytes, size: int):
        session, viewer = self._authenticated(header)
        source, layer = int(header["source"]), int(header["layer"])
        if not 0 <= source < len(session.credentials) or not session.plan.reads(viewer, source, layer):
            raise Refused("forbidden", f"participant {viewer} may not see participant {source} at layer {layer}")
        session_id = str(header["session"])
        if (source, layer) in session.kv:
            return self._deliver(session, viewer, source, layer)
        wait = min(float(header.get("wait_s", 0.0)), MAX_WAIT_S)
        self._waiters.append(_Waiter(identity, request_id, session_id, viewer, source, layer, time.monotonic() + wait))
        return None

    def _deliver(self, session: Session, viewer: int, source: int, layer: int) -> list:
        kv = session.kv[source, layer]
        frames = encode({"ok": True}, kv)
        session.wire_bytes[viewer, "down"] += message_bytes(frames)
        session.payload_bytes[viewer, "down"] += kv_nbytes(kv)
        return frames

    def _wake(self, session_id: str, source: int, layer: int) -> None:
        ready = [w for w in self._waiters if (w.session_id, w.source, w.layer) == (session_id, source, layer)]
        self._waiters = [w for w in self._waiters if w not in ready]
        for w in ready:
            self._reply(w.identity, w.request_id, self._deliver(self.sessions[session_id], w.viewer, source, layer))

    def _drop(self, session_id: str, why: str) -> None:
        """Free a session's K/V and fail whoever waits on it."""
        self.sessions.pop(session_id, None)
        for w in [w for w in self._waiters if w.session_id == session_id]:
            self._waiters.remove(w)
            self._error(w.identity, w.request_id, "unknown_session", f"session {session_id} {why}")

    def _expire(self) -> None:
        now = time.monotonic()
        for w in [w for w in self._waiters if w.deadline <= now]:
            self._waiters.remove(w)
            self._error(w.identity, w.request_id, "timeout",
                        f"participant {w.source}'s K/V at layer {w.layer} did not arrive in time")
        for session_id, session in list(self.sessions.items()):
            if now - session.last_used > self.session_ttl_s:
                self._drop(session_id, f"expired after {self.session_ttl_s:.0f} s idle")


def _by_participant(counts: dict[tuple[int, str], int]) -> dict[str, dict[int, int]]:
    """{"up": {participant: bytes}, "down": {...}}"""
    rows: dict[str, dict[int, int]] = {"up": {}, "down": {}}
    for (participant, direction), size in counts.items():
        rows[direction][participant] = size
    return rows


def write_ready_file(path: Path, endpoint: str) -> None:
    """Publish the bound endpoint atomically (a launcher polls for the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(endpoint)
    tmp.rename(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedattn_vllm.federated.coordinator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="tcp://127.0.0.1:5557", help="ZeroMQ endpoint to listen on")
    parser.add_argument("--session-ttl-s", type=float, default=600.0, help="free sessions idle this long")
    parser.add_argument("--ready-file", type=Path, help="write the bound endpoint here once listening")
    args = parser.parse_args(argv)
    key = os.environ.get("FEDATTN_ADMIN_KEY")
    if not key:
        parser.error("set FEDATTN_ADMIN_KEY (the orchestrator's secret for opening sessions)")
    logging.basicConfig(level=logging.INFO)
    coordinator = Coordinator(args.bind, key.encode(), session_ttl_s=args.session_ttl_s)
    log.info("coordinator listening on %s", coordinator.endpoint)
    if args.ready_file:
        write_ready_file(args.ready_file, coordinator.endpoint)
    coordinator.serve_forever()


if __name__ == "__main__":
    main()
