"""A party-side site: one party's own engine running its own participant of sessions opened elsewhere.

Every party runs a site (its server, its engine, its keypair); a coordinator between them
relays K/V. A session is opened at the coordinator with each participant bound to its
site's CURVE public key (`open_session`, by whichever party or host holds the coordinator's
admin key); nobody holds a credential of anyone else's. Each site then joins with its own
text, which never leaves it:

    site = PartySite(engine_endpoint, coordinator, keys=SiteKeys(...), control_key=...)
    flight = site.submit(PartyTask(session, participant=1, segment=ids, ...))   # poll() reports it

    describe   the coordinator says the session's config, depth, size and bindings (as participant n:
               the connection must carry n's key); the site checks them against what it was told
    submit     the site's engine tokenizes nothing new, reserves room and reports the length
    announce   the coordinator answers once every participant has announced, with every length
               (positions need them) - and in one order for every site, which starts sessions in
               that order, one per engine step (the ordering rule of docs/federated.md)
    run        K/V through the coordinator, sealed with the session key the parties agreed on
    alive      while its part runs, every ALIVE_S: the others, done, keep waiting for it
    leave      done: answered once every participant is (its K/V stays until then; left again while
               the others are alive); or failed: the session ends now, for every site
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import msgspec
import zmq

from fedattn_vllm.config import FedAttnConfig, FedAttnPlan
from fedattn_vllm.federated.client import CoordinatorError, ParticipantCalls, SessionAdmin, describe, session_bytes
from fedattn_vllm.federated.cluster import FederatedCluster, PieceCallback, _Flight
from fedattn_vllm.federated.curve import ClientCurve, Keypair, OrchestratorKeys

from fedattn_vllm.session import FedAttnSession, FedAttnSessionError, SessionResult

log = logging.getLogger(__name__)
ALIVE_S = 5.0  # a site computing a session says so this often (the coordinator presumes it gone after 30 s)
LEAVE_WAIT_S = 60.0  # a site done waits this long per leave for the others (then leaves again, if they live)


@dataclass(frozen=True)
class PartyTask:
    """This site's part of a session opened at the coordinator."""

    session_id: str
    participant: int
    plan: FedAttnPlan  # as the coordinator holds it (`PartySite.describe`)
    segment: list[int]  # this party's own token ids
    public_prefix: list[int] | None
    sampling_params: object | None  # vllm.SamplingParams: used if this participant generates
    seal_key: bytes | None  # the session key the parties agreed on (32 bytes; None: K/V unsealed)
    terms: bytes  # digest of everything every site must agree on (terms_digest)
    join_timeout_s: float  # how long to wait for the other participants to join

    @property
    def segments(self) -> list[list[int]]:
        """The session's segments as this site knows them: its own, and nothing of anyone else's."""
        return [self.segment if n == self.participant else [] for n in range(self.plan.num_participants)]


def terms_digest(**terms) -> bytes:
    """A digest of the session's terms (settings, prefix, sampling): sites that joined with different terms are
    refused together at the coordinator instead of computing a silently different answer."""
    return hashlib.sha256(msgspec.msgpack.encode(terms, order="sorted")).digest()


def open_session(coordinator: str, admin_key: bytes, curve: ClientCurve | None, site_keys: Sequence[bytes],
                 plan: FedAttnPlan) -> str:
    """Open a session at the coordinator with participant n bound to `site_keys[n]` (Z85), as a party site or a
    neutral host holding the admin key: the session's id. A connection of its own (any thread may call it)."""
    session_id = f"fedattn-{uuid.uuid4().hex}"
    with _admin(coordinator, admin_key, curve) as admin:
        admin.open(session_id, plan, list(site_keys))
    return session_id


def close_session(coordinator: str, admin_key: bytes, curve: ClientCurve | None, session_id: str) -> None:
    """Close a session at the coordinator before it ends: its K/V is freed, and every site waiting on it is told."""
    with _admin(coordinator, admin_key, curve) as admin:
        admin.close(session_id)


@contextmanager
def _admin(coordinator: str, admin_key: bytes, curve: ClientCurve | None) -> Iterator[SessionAdmin]:
    """An admin connection of its own, for one call from any thread."""
    admin = SessionAdmin(coordinator, admin_key, curve=curve)
    try:
        yield admin
    finally:
        admin.disconnect()


@dataclass(frozen=True)
class SiteKeys:
    """A site's keypair (its engine connects to the coordinator with it too) and the coordinator's public key."""

    keypair: Keypair
    coordinator: bytes

    def to_coordinator(self) -> ClientCurve:
        return ClientCurve(self.keypair, self.coordinator)


class PartySite(FederatedCluster):
    """One party's orchestrator over its own engine (engine 0), for sessions whose participants are bound to
    the parties' CURVE keys. `admin_key` (optional) lets this party open sessions too."""

    def __init__(self, engine: str, coordinator: str, *, control_key: bytes, keys: SiteKeys | None,
                 admin_key: bytes | None = None, insecure: bool = False, timeout_s: float = 60.0, launcher=None):
        orchestrator_keys = keys and OrchestratorKeys(keys.keypair, keys.coordinator, (keys.keypair.public,))
        super().__init__([engine], coordinator, None, control_key=control_key, keys=orchestrator_keys,
                         insecure=insecure, timeout_s=timeout_s, launcher=launcher)
        self._admin_key = admin_key
        self.site_keys = keys
        self.public_key = keys.keypair.public if keys else None
        self._calls = ParticipantCalls(coordinator, curve=keys and keys.to_coordinator())
        self._poller.register(self._calls.socket, zmq.POLLIN)
        self._tasks: dict[str, PartyTask] = {}  # by session id, while in flight
        self._alive_at: dict[str, float] = {}  # by session id: when this site last said it is still computing

    # -- sessions ------------------------------------------------------------------------------
    def open_session(self, site_keys: Sequence[bytes], config: FedAttnConfig) -> str:
        """Open a session at the coordinator, participant n bound to `site_keys[n]` (Z85): its id (any thread)."""
        if self._admin_key is None:
            raise FedAttnSessionError("admin_key", "this site holds no coordinator admin key: it cannot open sessions")
        return open_session(self.coordinator, self._admin_key, self.site_keys and self.site_keys.to_coordinator(),
                            site_keys, config.resolve(self.num_layers, len(site_keys)))

    def close_session(self, session_id: str) -> None:
        """Close a session (this site's admin key) at the coordinator: whoever joined it gets an error (any thread)."""
        if self._admin_key is None:
            raise FedAttnSessionError("admin_key", "this site holds no coordinator admin key: it cannot close sessions")
        close_session(self.coordinator, self._admin_key, self.site_keys and self.site_keys.to_coordinator(), session_id)

    def describe(self, session_id: str, participant: int, *, sites: Sequence[bytes],
                 timeout_s: float = 10.0) -> FedAttnPlan:
        """The session's plan as the coordinator holds it (any thread), checked against what this party was told:
        participant n bound to `sites[n]` (Z85 public keys). FedAttnSessionError if it cannot be used: `session`
        (unknown for this site's key, or the coordinator is down), `sites` (bound to other keys) or `model`."""
        try:
            found = describe(self.coordinator, session_id, participant, timeout_s=timeout_s,
                             curve=self.site_keys and self.site_keys.to_coordinator())
        except CoordinatorError as error:
            if error.code == "unreachable":
                raise FedAttnSessionError("session", f"the coordinator did not answer for session {session_id}, "
                                          f"participant {participant}: no such session for this site's key, or "
                                          "the coordinator is down") from None
            raise FedAttnSessionError("session", str(error)) from None
        if [key.encode() for key in found["participant_keys"]] != list(sites):
            raise FedAttnSessionError("sites", f"the coordinator binds session {session_id}'s participants to other "
                                      "sites than this party was told: refusing to compute with them")
        if found["num_layers"] != self.num_layers:
            raise FedAttnSessionError("model", f"the session is for a {found['num_layers']}-layer model; this "
                                      f"site serves {self.model} ({self.num_layers} layers)")
        return FedAttnConfig(**found["config"]).resolve(found["num_layers"], found["num_participants"])

    def submit(self, task: PartyTask, *, on_piece: PieceCallback | None = None) -> str:
        """Join with this site's part (its engine, then the coordinator); `poll` reports the result."""
        if task.session_id in self._flights:
            raise FedAttnSessionError("session", f"{task.session_id} is already running on this site")
        flight = self._flights[task.session_id] = _Flight(task.session_id, task.plan, {0: [task.participant]},
                                                          on_piece=on_piece)
        self._tasks[task.session_id] = task
        if 0 in self.down or self.coordinator_down:  # fails for every site at once; `poll` reports it
            self._fail(flight, self.coordinator_down or f"the site's engine is down: {self.down[0]}")
            return task.session_id
        self._send_submit(flight, 0, FedAttnSession(task.segments, task.plan.config, task.sampling_params,
                                                    public_prefix=task.public_prefix),
                          {task.participant: None}, task.seal_key)
        return task.session_id

    def _on_ready(self, flight: _Flight) -> None:
        """This site's engine has room and its length: tell the coordinator, and start once every site has."""
        task = self._tasks[flight.session_id]
        self._calls.announce(flight.session_id, task.participant, flight.lengths[task.participant],
                             min(flight.prefix_lens), task.terms, task.join_timeout_s)

    def poll(self, timeout_ms: int = 100):
        ended = super().poll(timeout_ms)
        for op, session_id, answer in self._calls.answers():
            flight = self._flights.get(session_id)
            if flight is None or flight.result is not None:
                continue
            if isinstance(answer, CoordinatorError):
                if op == "leave" and answer.code == "pending":  # the others are still computing: wait on
                    self._leave(flight)
                    continue
                if op == "announce" and answer.code == "conflict":  # the sites joined on different terms
                    flight.error_field = "invitation"
                self._fail(flight, f"the coordinator: {answer}")
            elif op == "announce":
                self._start(flight, answer)
            elif op == "leave":  # every participant is done
                flight.result = SessionResult(outputs=dict(sorted(flight.outputs.items())),
                                              cost=self._cost(flight, session_bytes(answer)),
                                              wall_s=time.monotonic() - flight.started)
        for op, session_id in self._calls.overdue():
            if (flight := self._flights.get(session_id)) is not None and flight.result is None:
                self._fail(flight, f"the coordinator did not answer this site's {op} in time")
        self._heartbeat()
        ended.update({i: f.result for i, f in self._flights.items() if f.result is not None})
        for session_id in ended:
            self._flights.pop(session_id, None)
            self._tasks.pop(session_id, None)
            self._alive_at.pop(session_id, None)
        return ended

    def _start(self, flight: _Flight, answer: dict) -> None:
        """Every site has announced: start, in the order the coordinator answered (one session per wave)."""
        own = self._tasks[flight.session_id].participant
        lengths = answer["lengths"]
        if len(lengths) != flight.plan.num_participants or lengths[own] != flight.lengths[own]:
            return self._fail(flight, f"the coordinator announced lengths {lengths} that do not fit this site's")
        flight.lengths = dict(enumerate(int(n) for n in lengths))
        self._alive_at[flight.session_id] = time.monotonic()  # computing from now: `_heartbeat` says so
        self._go(flight, 0)
        self._send_wave()

    def _heartbeat(self) -> None:
        """`alive` every ALIVE_S for each session this site is still computing (the others may be waiting on it)."""
        now = time.monotonic()
        for session_id, last in self._alive_at.items():
            if now - last >= ALIVE_S and not self._calls.outstanding("alive", session_id):
                self._alive_at[session_id] = now
                self._calls.alive(session_id, self._tasks[session_id].participant)

    def _complete(self, flight: _Flight) -> None:
        """This site's part is done: leave; the result comes when every participant's is (or the session fails)."""
        self._alive_at.pop(flight.session_id, None)
        self._leave(flight)

    def _leave(self, flight: _Flight) -> None:
        self._calls.leave(flight.session_id, self._tasks[flight.session_id].participant, LEAVE_WAIT_S)

    def _release(self, flight: _Flight, failed: str | None) -> dict:
        """End the session for everyone: every participant's byte counts so far. Why stays here (an engine's error
        text is this site's business); the others learn only that this site failed."""
        if failed:
            log.warning("session %s failed at this site: %s", flight.session_id, failed)
        task = self._tasks[flight.session_id]
        return self._calls.fail(flight.session_id, task.participant, "the participant's site failed")

    def close(self) -> None:
        self._calls.close()
        super().close()

