"""Clients of the coordinator: the orchestrator's session admin, a party-side site's participant calls and an
engine's networked K/V exchange."""

from __future__ import annotations

import os
import threading
import time

import zmq

from fedattn_vllm.config import FedAttnPlan
from fedattn_vllm.exchange import KVExchange, KVExchangeError, Payload, PayloadKind
from fedattn_vllm.federated.curve import ClientCurve
from fedattn_vllm.federated.sealing import SessionSeal
from fedattn_vllm.federated.wire import SealedPayload, decode, encode


class CoordinatorError(KVExchangeError):
    """The coordinator refused a request or did not answer; `code` says which."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class CoordinatorConnection:
    """Synchronous request/reply over one DEALER socket (use one per thread); `curve`: None = plaintext."""

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, curve: ClientCurve | None = None):
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.connect(endpoint)
        self.timeout_s = timeout_s
        self._counter = 0

    def call(self, header: dict, kv: Payload | None = None, *, timeout_s: float | None = None) -> tuple[dict, Payload | None]:
        """Send one request and wait for its reply; raises CoordinatorError on refusal or timeout."""
        self._counter += 1
        request_id = self._counter.to_bytes(8, "little")
        self._socket.send_multipart([request_id, *encode(header, kv)], copy=False)
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        while self._socket.poll(timeout_ms):
            reply_id, *frames = self._socket.recv_multipart(copy=False)
            if reply_id.bytes != request_id:
                continue  # the late answer to a request that already timed out
            reply, payload = decode(frames)
            if not reply.get("ok"):
                raise CoordinatorError(reply.get("code", "error"), reply.get("error", "refused"))
            return reply, payload
        raise CoordinatorError("unreachable", f"no answer from the coordinator within {timeout_ms / 1000:.1f} s")

    def close(self) -> None:
        self._socket.close(0)


class SessionAdmin:
    """The orchestrator's side: opens sessions (getting per-participant credentials), reads counters, closes."""

    def __init__(self, endpoint: str, admin_key: bytes, *, timeout_s: float = 30.0, curve: ClientCurve | None = None):
        self._connection = CoordinatorConnection(endpoint, timeout_s=timeout_s, curve=curve)
        self._key = admin_key

    def open(self, session: str, plan: FedAttnPlan, participant_keys: list[bytes] | None = None) -> list[bytes]:
        """Open `session` for `plan` (sent as its config, depth and size); one credential per participant, or
        none when `participant_keys` binds each participant to its site's CURVE public key."""
        reply, _ = self._connection.call({
            "op": "open", "admin_key": self._key, "session": session, "config": plan.config.to_dict(),
            "num_layers": plan.num_layers, "num_participants": plan.num_participants,
            **({"participant_keys": participant_keys} if participant_keys is not None else {}),
        })
        return list(reply["credentials"])

    def stats(self, session: str) -> dict:
        reply, _ = self._connection.call({"op": "stats", "admin_key": self._key, "session": session})
        return session_bytes(reply)

    def close(self, session: str) -> None:
        self._connection.call({"op": "close", "admin_key": self._key, "session": session})

    def counters(self, timeout_s: float | None = None) -> dict:
        """The coordinator's open sessions, waiting fetches, K/V bytes held and dropped messages by reason."""
        reply, _ = self._connection.call({"op": "counters", "admin_key": self._key}, timeout_s=timeout_s)
        return {k: reply[k] for k in ("sessions", "waiters", "stored_bytes", "dropped")}

    def disconnect(self) -> None:
        self._connection.close()


def describe(endpoint: str, session: str, participant: int, *, curve: ClientCurve | None,
             timeout_s: float = 10.0) -> dict:
    """The session's config, depth, size and participants' CURVE keys as the coordinator holds them, asked as
    `participant` (a connection authenticated with that participant's CURVE key); raises CoordinatorError
    ("unreachable" also when the coordinator drops the request because this site is not that participant)."""
    connection = CoordinatorConnection(endpoint, timeout_s=timeout_s, curve=curve)
    try:
        reply, _ = connection.call({"op": "describe", "session": session, "participant": participant})
    finally:
        connection.close()
    return {k: reply[k] for k in ("config", "num_layers", "num_participants", "participant_keys")}


class ParticipantCalls:
    """A party-side site's calls for its own participants, answered through `socket` (`answers`, when it polls
    readable). `announce` and `leave` are held at the coordinator until every participant of the session has made
    the same call; `alive` (a heartbeat while the part runs) at once; `fail` synchronously. A call unanswered
    `ANSWER_MARGIN_S` past its wait is `overdue` (the coordinator restarted, or lost it). Use from one thread."""

    ANSWER_MARGIN_S = 15.0

    def __init__(self, endpoint: str, *, curve: ClientCurve | None, timeout_s: float = 30.0,
                 fail_timeout_s: float = 5.0):
        self._now = CoordinatorConnection(endpoint, timeout_s=timeout_s, curve=curve)
        self._fail_timeout_s = fail_timeout_s  # `fail` blocks its caller (every session of the site): briefly
        self.socket = zmq.Context.instance().socket(zmq.DEALER)  # answered in the order released
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(endpoint)
        self._deadlines: dict[tuple[str, str], float] = {}  # (op, session) -> when its answer is overdue

    def announce(self, session: str, participant: int, length: int, prefix_len: int, terms: bytes,
                 wait_s: float) -> None:
        self._send({"op": "announce", "session": session, "participant": participant, "length": length,
                    "prefix_len": prefix_len, "terms": terms, "wait_s": wait_s})

    def leave(self, session: str, participant: int, wait_s: float) -> None:
        """Done: answered, with every participant's byte counts, once every participant is (or `pending`)."""
        self._send({"op": "leave", "session": session, "participant": participant, "wait_s": wait_s})

    def alive(self, session: str, participant: int) -> None:
        """This participant is still computing: the session does not expire, the others keep waiting."""
        self._send({"op": "alive", "session": session, "participant": participant})

    def _send(self, header: dict) -> None:
        self._deadlines[header["op"], header["session"]] = (time.monotonic() + header.get("wait_s", 0.0)
                                                            + self.ANSWER_MARGIN_S)
        self.socket.send_multipart([f"{header['op']}:{header['session']}".encode(), *encode(header)], copy=False)

    def answers(self) -> list[tuple[str, str, dict | CoordinatorError]]:
        """(operation, session, reply or refusal) of the calls answered since the last call."""
        answered = []
        while self.socket.poll(0):
            tag, *frames = self.socket.recv_multipart(copy=False)
            op, _, session = tag.bytes.decode().partition(":")
            self._deadlines.pop((op, session), None)
            try:
                reply, _ = decode(frames)
            except ValueError as error:
                reply = {"ok": False, "code": "malformed", "error": str(error)}
            answered.append((op, session, reply if reply.get("ok") else
                             CoordinatorError(reply.get("code", "error"), reply.get("error", "refused"))))
        return answered

    def outstanding(self, op: str, session: str) -> bool:
        return (op, session) in self._deadlines

    def overdue(self) -> list[tuple[str, str]]:
        """(operation, session) of the calls whose answer is overdue (forgotten here once reported)."""
        now = time.monotonic()
        late = [key for key, deadline in self._deadlines.items() if deadline < now]
        for key in late:
            del self._deadlines[key]
        return late

    def fail(self, session: str, participant: int, reason: str) -> dict:
        """End the session for everyone now; every participant's byte counts so far (`session_bytes`)."""
        for op in ("announce", "leave", "alive"):
            self._deadlines.pop((op, session), None)
        reply, _ = self._now.call({"op": "leave", "session": session, "participant": participant, "failed": True,
                                   "reason": reason[:512]}, timeout_s=self._fail_timeout_s)
        return session_bytes(reply)

    def close(self) -> None:
        self._now.close()
        self.socket.close(0)


def session_bytes(reply: dict) -> dict:
    """{"wire_bytes"|"payload_bytes": {"up"|"down": {participant: bytes}}} of a stats or leave answer."""
    return {kind: {d: {int(p): int(size) for p, size in reply[kind][d].items()} for d in ("up", "down")}
            for kind in ("wire_bytes", "payload_bytes")}


class NetworkKVExchange(KVExchange):
    """An engine's exchange: its participants publish and fetch through the coordinator.

    The engine knows only the credentials of the participants it hosts (`join`). A fetch
    waits up to the session's `wait_s` for K/V not yet published (pipelined prefill), then fails.
    A session joined with a seal key publishes sealed K/V and accepts only K/V sealed with it (sealing.py).
    """

    def __init__(self, endpoint: str, *, wait_s: float = 60.0, curve: ClientCurve | None = None):
        super().__init__()
        self.endpoint = endpoint
        self._curve = curve
        self.wait_s = wait_s  # unless the session sets its own
        self._local = threading.local()
        self._credentials: dict[tuple[str, int], bytes] = {}
        self._wait_s: dict[str, float] = {}
        self._seals: dict[str, SessionSeal] = {}

    def _connection(self) -> CoordinatorConnection:
        if getattr(self._local, "pid", None) != os.getpid():  # one socket per thread and process
            self._local.connection, self._local.pid = CoordinatorConnection(self.endpoint, curve=self._curve), os.getpid()
        return self._local.connection

    def join(self, session: str, participant: int, credential: bytes | None, *, wait_s: float | None = None,
             seal_key: bytes | None = None) -> None:
        """Host `participant` of `session`: its credential (None: the session binds it to this engine's CURVE key)."""
        with self._lock:
            self._credentials[session, participant] = credential or b""
            if wait_s is not None:
                self._wait_s[session] = wait_s
            if seal_key is not None:
                self._seals[session] = SessionSeal(seal_key, session)

    def joined_sessions(self) -> int:
        """Sessions this engine holds credentials for."""
        with self._lock:
            return len({session for session, _ in self._credentials})

    def _credential(self, session: str, participant: int) -> dict:
        """The header field that authenticates `participant` (none when its CURVE key does)."""
        with self._lock:
            credential = self._credentials.get((session, participant))
        if credential is None:
            raise KVExchangeError(f"session {session}: participant {participant} is not hosted by this engine")
        return {"credential": credential} if credential else {}

    def publish(self, session: str, participant: int, layer: int, kv: Payload,
                kind: PayloadKind = PayloadKind.KV) -> None:
        header = {"op": "publish", "session": session, "participant": participant, "layer": layer,
                  **_kind_field(kind), **self._credential(session, participant)}
        seal = self._seal(session)
        self._connection().call(header, kv if seal is None else seal.seal(participant, layer, kv, kind))
        self._count_published(session, participant, kv, kind)

    def fetch(self, session: str, viewer: int, source: int, layer: int,
              kind: PayloadKind = PayloadKind.KV) -> Payload:
        with self._lock:
            wait_s = self._wait_s.get(session, self.wait_s)
        header = {"op": "fetch", "session": session, "participant": viewer, "source": source, "layer": layer,
                  **_kind_field(kind), **self._credential(session, viewer), "wait_s": wait_s}
        _, payload = self._connection().call(header, timeout_s=wait_s + 5.0)
        seal = self._seal(session)
        if seal is not None:
            kv = seal.open(source, layer, payload, kind)
        elif isinstance(payload, SealedPayload) or payload is None:
            raise KVExchangeError(f"participant {source}'s {kind.noun} at layer {layer}: sealed, or missing, in a "
                                  "session without a seal key")
        else:
            kv = payload
        self._count_received(session, viewer, kv, kind)
        return kv

    def _seal(self, session: str) -> SessionSeal | None:
        with self._lock:
            return self._seals.get(session)

    def release(self, session: str) -> None:
        with self._lock:
            self._stats.pop(session, None)
            self._wait_s.pop(session, None)
            self._seals.pop(session, None)
            for key in [k for k in self._credentials if k[0] == session]:
                del self._credentials[key]


def _kind_field(kind: PayloadKind) -> dict:
    """The header's `kind`, left out for K/V (the default: no bytes spent on the frequent case)."""
    return {} if kind is PayloadKind.KV else {"kind": kind.value}
