"""The coordinator: relays sync-layer K/V between the engines of federated sessions.

It never sees text or token ids, only K/V tensors (and with question selection
the generators' question queries), and hands each participant only what
the spec lets it see. Sessions are opened by the orchestrator (admin key), which gets one
credential per participant; an engine presents its participant's credential with every
publish or fetch. Every message is size-capped, decoded into its typed form (messages.py)
and authenticated before anything else uses it; a malformed or unauthenticated one is
dropped unanswered and counted (`dropped`, the admin's `counters`). A fetch of K/V not
yet published waits (pipelined prefill) until it is published or the caller's deadline passes.

A session may instead bind each participant to a site's CURVE key (party-side sites: the
opener then holds no credential of anyone's). Such sites `describe` the session, `announce`
their lengths (held until every participant has, then answered together in one order) and
`leave` when done (held until all are; `pending` while the others still say `alive`), or
failed (the session ends for everyone). Sessions are freed when closed, when every
participant has left, or when idle longer than `session_ttl_s` (an orchestrator that died
leaves nothing behind).

    python -m fedattn_vllm.federated.coordinator --bind tcp://0.0.0.0:5557 \\
        --keypair keys/coordinator.key_secret --trust keys/peers   # CURVE: curve.py
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError
from fedattn_vllm.exchange import PayloadKind
from fedattn_vllm.federated import curve as link_security
from fedattn_vllm.federated import messages as m
from fedattn_vllm.federated.curve import ServerCurve, bind_or_close
from fedattn_vllm.federated.lifeline import exit_with_parent
from fedattn_vllm.federated.relay import Session
from fedattn_vllm.federated.wire import Dropped, WirePayload, WireError, decode, encode, message_bytes, payload_nbytes

log = logging.getLogger(__name__)
MAX_FRAME_BYTES = 1 << 30  # a larger frame makes ZeroMQ drop its sender (one layer's K/V is far smaller)
MAX_STORED_BYTES = 8 << 30  # K/V held for all open sessions; a publish beyond it is refused ("busy")
MAX_WAITERS = 1 << 16  # fetches waiting for a publish; one more is refused ("busy")
MAX_SESSIONS = 4096  # sessions open at once; opening one more is refused ("busy") until one closes or expires


class Refused(Exception):
    """A request the coordinator answers with an error (`code` says which kind)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Held:
    """A participant's announce or leave, answered once every participant of its session has made one."""

    identity: bytes
    request_id: bytes
    session_id: str
    participant: int
    kind: type  # m.Announce | m.Leave
    deadline: float


@dataclass
class _Waiter:
    identity: bytes
    request_id: bytes
    session_id: str
    viewer: int
    source: int
    layer: int
    kind: PayloadKind
    deadline: float


class Coordinator:
    """Runs on one ROUTER socket; `serve_forever` in a thread or its own process."""

    def __init__(self, bind: str, admin_key: bytes, *, session_ttl_s: float = 600.0,
                 max_frame_bytes: int = MAX_FRAME_BYTES, max_stored_bytes: int = MAX_STORED_BYTES,
                 max_sessions: int = MAX_SESSIONS, curve: ServerCurve | None = None):
        """`curve`: encrypt, and accept only the engines and orchestrators it trusts (None: plaintext)."""
        self.admin_key = admin_key
        self.session_ttl_s = session_ttl_s
        self.max_sessions = max_sessions
        self.max_stored_bytes = max_stored_bytes
        self.stored_bytes = 0  # K/V payload held for all open sessions
        self._context = zmq.Context()
        self._authenticator = curve.start(self._context) if curve is not None else None
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        if curve is not None:
            curve.apply(self._socket)
        bind_or_close(self._socket, bind, self._authenticator)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sessions: dict[str, Session] = {}
        self.dropped = Dropped(__name__)  # messages dropped unanswered, by reason
        self._waiters: list[_Waiter] = []
        self._held: list[_Held] = []
        self._stop = threading.Event()

    # -- the loop ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(timeout=self._poll_ms()):
                    try:
                        self._receive()
                    except Exception:  # a bug reached by one message: it is dropped, never the relay for everyone
                        self.dropped.drop("internal", "handling a message raised")
                        log.exception("a message could not be handled; dropped")
                self._expire()
        finally:
            self._socket.close(0)
            if self._authenticator is not None:
                self._authenticator.stop()
            self._context.term()

    def stop(self) -> None:
        self._stop.set()

    def _poll_ms(self) -> int:
        deadlines = [w.deadline for w in [*self._waiters, *self._held]]
        if not deadlines:
            return 100
        return max(0, min(100, int(1000 * (min(deadlines) - time.monotonic())) + 1))

    def _receive(self) -> None:
        frames = self._socket.recv_multipart(copy=False)
        if len(frames) < 3:  # [identity, request id, header, *tensors]
            return self.dropped.drop("malformed", "too few frames")
        identity, request_id, *message = frames
        self._process(identity.bytes, request_id.bytes, message)

    def _process(self, identity: bytes, request_id: bytes, message: list) -> None:
        """Decode, authenticate, handle and answer one request ([header, *tensors])."""
        try:
            request, kv = decode(message, m.CoordinatorRequest)
        except WireError as error:
            return self.dropped.drop("malformed", str(error))
        if not self._authentic(request, _peer_key(message[0])):
            return self.dropped.drop("unauthenticated", type(request).__name__)
        try:
            reply = self._handle(request, kv, identity, request_id, message_bytes(message))
        except Refused as error:
            reply = encode({"ok": False, "code": error.code, "error": str(error)})
        except Exception as error:  # a bug, never a reason to stop relaying for every other session
            log.exception("handling a %s request failed", type(request).__name__)
            reply = encode({"ok": False, "code": "internal", "error": f"{type(error).__name__}: {error}"})
        if reply is not None:
            self._reply(identity, request_id, reply)

    def _authentic(self, request, peer_key: bytes | None) -> bool:
        """The admin key; or for a participant of an open session, its credential, or in a session binding
        participants to keys, the CURVE key its connection authenticated with (unknown sessions pass: they are
        answered `unknown_session`, which reveals nothing a random id does not)."""
        if isinstance(request, m.ADMIN_REQUESTS):
            return hmac.compare_digest(request.admin_key, self.admin_key)
        session = self.sessions.get(request.session)
        if session is None:
            return True
        if request.participant >= session.plan.num_participants:
            return False
        if session.keys is not None:
            return peer_key is not None and hmac.compare_digest(peer_key, session.keys[request.participant])
        return request.credential is not None and hmac.compare_digest(
            request.credential, session.credentials[request.participant])

    def _reply(self, identity: bytes, request_id: bytes, frames: list) -> None:
        self._socket.send_multipart([identity, request_id, *frames], copy=False)

    def _error(self, identity: bytes, request_id: bytes, code: str, message: str) -> None:
        self._reply(identity, request_id, encode({"ok": False, "code": code, "error": message}))

    def _handle(self, request, kv: WirePayload | None, identity: bytes, request_id: bytes, size: int):
        if isinstance(request, m.Open):
            return self._open(request)
        if isinstance(request, m.Counters):
            return encode({"ok": True, "sessions": len(self.sessions), "waiters": len(self._waiters) + len(self._held),
                           "stored_bytes": self.stored_bytes, "dropped": dict(self.dropped)})
        session = self._session(request.session)
        if isinstance(request, m.Close):
            self._drop(request.session, "closed")
            return encode({"ok": True})
        if isinstance(request, m.Stats):
            return encode({"ok": True, **session.byte_counts()})
        session.seen[request.participant] = time.monotonic()  # a participant's request, authenticated
        if isinstance(request, m.Publish):
            return self._publish(session, request, kv, size)
        if isinstance(request, m.Describe):
            return encode({"ok": True, "config": session.plan.config.to_dict(), "num_layers": session.plan.num_layers,
                           "num_participants": session.plan.num_participants,
                           "participant_keys": [k.decode() for k in session.keys or ()]})
        if isinstance(request, m.Alive):
            return encode({"ok": True})
        if isinstance(request, m.Announce):
            return self._announce(session, request, identity, request_id)
        if isinstance(request, m.Leave):
            return self._leave(session, request, identity, request_id)
        return self._fetch(session, request, identity, request_id)

    # -- admin -----------------------------------------------------------------------------
    def _open(self, request: m.Open):
        if request.session in self.sessions:
            raise Refused("conflict", f"session {request.session} already exists")
        if len(self.sessions) >= self.max_sessions:
            raise Refused("busy", f"{len(self.sessions)} sessions are open (max {self.max_sessions}); each is freed "
                          f"when closed or after {self.session_ttl_s:.0f} s idle")
        try:
            plan = FedAttnConfig(**request.config).resolve(request.num_layers, request.num_participants)
        except FedAttnConfigError as error:
            raise Refused("bad_request", f"config.{error}") from None
        except TypeError as error:  # a field FedAttnConfig does not have
            raise Refused("bad_request", f"config: {error}") from None
        keys = request.participant_keys
        if keys is not None:
            if self._authenticator is None:
                raise Refused("bad_request", "participant_keys: binding participants to keys needs CURVE")
            if len(keys) != request.num_participants:
                raise Refused("bad_request", f"participant_keys: {len(keys)} keys for {request.num_participants} "
                              "participants")
        credentials = [] if keys is not None else [secrets.token_bytes(16) for _ in range(request.num_participants)]
        self.sessions[request.session] = Session(plan, credentials, keys)
        return encode({"ok": True, "credentials": credentials})

    # -- participants ---------------------------------------------------------------------
    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise Refused("unknown_session", f"no session {session_id} (never opened, closed or expired)")
        session.last_used = time.monotonic()
        return session

    def _publish(self, session: Session, request: m.Publish, kv: WirePayload | None, size: int):
        n, layer, kind = request.participant, request.layer, PayloadKind(request.kind)
        if kv is None:
            raise Refused("bad_request", "publish carries tensor frames")
        if not session.may_publish(n, layer, kind):
            raise Refused("forbidden", f"participant {n} does not share {kind.noun} at layer {layer}")
        if (n, layer, kind) in session.kv:
            raise Refused("conflict", f"participant {n} already published {kind.noun} at layer {layer}")
        if self.stored_bytes + payload_nbytes(kv) > self.max_stored_bytes:
            raise Refused("busy", f"the coordinator holds {self.stored_bytes} bytes of K/V (max {self.max_stored_bytes})")
        session.kv[n, layer, kind] = kv
        self.stored_bytes += payload_nbytes(kv)
        session.wire_bytes[n, "up"] += size
        session.payload_bytes[n, "up"] += payload_nbytes(kv)
        self._wake(request.session, n, layer, kind)
        return encode({"ok": True})

    def _fetch(self, session: Session, request: m.Fetch, identity: bytes, request_id: bytes):
        viewer, source, layer, kind = request.participant, request.source, request.layer, PayloadKind(request.kind)
        if source >= session.plan.num_participants or not session.may_fetch(viewer, source, layer, kind):
            raise Refused("forbidden", f"participant {viewer} may not see participant {source}'s {kind.noun} at "
                          f"layer {layer}")
        if (source, layer, kind) in session.kv:
            return self._deliver(session, viewer, source, layer, kind)
        if len(self._waiters) >= MAX_WAITERS:
            raise Refused("busy", f"{len(self._waiters)} fetches are waiting already")
        self._waiters.append(_Waiter(identity, request_id, request.session, viewer, source, layer, kind,
                                     time.monotonic() + request.wait_s))
        return None

    def _announce(self, session: Session, request: m.Announce, identity: bytes, request_id: bytes):
        """Hold the announcement until every participant has made one; then answer them all at once, so every
        site learns that the session can start in the same order (one socket per site keeps it)."""
        if request.participant in session.announced:
            raise Refused("conflict", f"participant {request.participant} already announced")
        self._hold(identity, request_id, request)
        session.announced[request.participant] = (request.length, request.prefix_len, request.terms)
        if len(session.announced) < session.plan.num_participants:
            return None
        mine = self._release_held(request.session, m.Announce)
        terms = {(prefix, digest) for _, prefix, digest in session.announced.values()}
        if len(terms) > 1:  # different public prefixes or settings: every position or answer would be off
            self._drop(request.session, "refused")
            reply = encode({"ok": False, "code": "conflict", "error": "the participants joined with different "
                            "session terms (public prefix, settings or invitation)"})
        else:
            reply = encode({"ok": True, "lengths": [session.announced[n][0] for n in range(len(session.announced))]})
        for announcer in mine:
            self._reply(announcer.identity, announcer.request_id, reply)
        return None

    def _leave(self, session: Session, request: m.Leave, identity: bytes, request_id: bytes):
        """A failure ends the session now (answered with every participant's byte counts). A participant done is
        answered, with every participant's byte counts, once every participant is: the session then ends and is
        freed; if it fails first, with the failure."""
        n = request.participant
        if request.failed:
            reply = encode({"ok": True, **session.byte_counts()})
            self._drop(request.session, f"ended: participant {n} failed ({request.reason or 'no reason given'})")
            return reply
        if n in session.left:
            raise Refused("conflict", f"participant {n} already left")
        self._hold(identity, request_id, request)
        session.left.add(n)
        if len(session.left) < session.plan.num_participants:
            return None
        reply = encode({"ok": True, **session.byte_counts()})
        for held in self._release_held(request.session, m.Leave):
            self._reply(held.identity, held.request_id, reply)
        self._drop(request.session, "finished")
        return None

    def _hold(self, identity: bytes, request_id: bytes, request: m.Announce | m.Leave) -> None:
        if len(self._waiters) + len(self._held) >= MAX_WAITERS:
            raise Refused("busy", "too many requests are waiting already")
        self._held.append(_Held(identity, request_id, request.session, request.participant, type(request),
                                time.monotonic() + request.wait_s))

    def _release_held(self, session_id: str, kind: type) -> list[_Held]:
        released = [h for h in self._held if (h.session_id, h.kind) == (session_id, kind)]
        self._held = [h for h in self._held if h not in released]
        return released

    def _deliver(self, session: Session, viewer: int, source: int, layer: int, kind: PayloadKind) -> list:
        kv = session.kv[source, layer, kind]
        frames = encode({"ok": True}, kv)
        session.wire_bytes[viewer, "down"] += message_bytes(frames)
        session.payload_bytes[viewer, "down"] += payload_nbytes(kv)
        return frames

    def _wake(self, session_id: str, source: int, layer: int, kind: PayloadKind) -> None:
        slot = (session_id, source, layer, kind)
        ready = [w for w in self._waiters if (w.session_id, w.source, w.layer, w.kind) == slot]
        self._waiters = [w for w in self._waiters if w not in ready]
        for w in ready:
            self._reply(w.identity, w.request_id,
                        self._deliver(self.sessions[session_id], w.viewer, source, layer, kind))

    def _drop(self, session_id: str, why: str) -> None:
        """Free a session's K/V and fail whoever waits on it."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.stored_bytes -= sum(payload_nbytes(kv) for kv in session.kv.values())
        for w in [w for w in [*self._waiters, *self._held] if w.session_id == session_id]:
            (self._waiters if isinstance(w, _Waiter) else self._held).remove(w)
            self._error(w.identity, w.request_id, "unknown_session", f"session {session_id} {why}")

    def _expire(self) -> None:
        now = time.monotonic()
        for w in [w for w in self._waiters if w.deadline <= now]:
            self._waiters.remove(w)
            self._error(w.identity, w.request_id, "timeout",
                        f"participant {w.source}'s {w.kind.noun} at layer {w.layer} did not arrive in time")
        for held in [h for h in self._held if h.deadline <= now]:
            self._held.remove(held)
            session = self.sessions.get(held.session_id)
            done = (session.announced if held.kind is m.Announce else session.left) if session else {}
            missing = sorted(set(range(session.plan.num_participants)) - set(done)) if session else []
            if held.kind is m.Leave and session and not session.silent(missing, now):  # still computing: wait on
                session.left.discard(held.participant)
                self._error(held.identity, held.request_id, "pending", f"participants {missing} are still "
                            "computing: leave again")
                continue
            self._error(held.identity, held.request_id, "timeout", f"participants {missing} did not "
                        f"{'join' if held.kind is m.Announce else 'finish'} in time")
        for session_id, session in list(self.sessions.items()):
            if now - session.last_used > self.session_ttl_s:
                self._drop(session_id, f"expired after {self.session_ttl_s:.0f} s idle")


def _peer_key(frame) -> bytes | None:
    """The CURVE public key (Z85) the message's connection authenticated with (ZeroMQ's User-Id; None without CURVE)."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None
    return user.encode() if user else None


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
    parser.add_argument("--parent-pid", type=int, help="terminate when this process (the launcher) exits")
    parser.add_argument("--max-kv-gib", type=float, default=MAX_STORED_BYTES / 2**30,
                        help="K/V held for all open sessions at once; a publish beyond it is refused")
    parser.add_argument("--max-frame-mib", type=int, default=MAX_FRAME_BYTES >> 20,
                        help="largest frame accepted (one tensor of a layer's K/V); a larger one "
                        "disconnects its sender")
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS,
                        help="sessions open at once; opening one more is refused until one closes or expires")
    link_security.add_arguments(parser, serves=True, coordinator_client=False)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    key = os.environ.get("FEDATTN_ADMIN_KEY")
    if not key:
        parser.error("set FEDATTN_ADMIN_KEY (the orchestrator's secret for opening sessions)")
    curve = link_security.server_curve(args, parser)
    logging.basicConfig(level=logging.INFO)
    coordinator = Coordinator(args.bind, key.encode(), session_ttl_s=args.session_ttl_s,
                              max_frame_bytes=args.max_frame_mib << 20, max_stored_bytes=int(args.max_kv_gib * 2**30),
                              max_sessions=args.max_sessions, curve=curve)
    log.info("coordinator listening on %s (%s)", coordinator.endpoint,
             "plaintext: --insecure" if curve is None else f"CURVE, trusting the keys in {args.trust}")
    if args.ready_file:
        write_ready_file(args.ready_file, coordinator.endpoint)
    coordinator.serve_forever()


if __name__ == "__main__":
    main()
