"""The orchestrator: runs FedAttn sessions across federated engines, each holding only its participants.

    cluster = FederatedCluster(["tcp://a:5560", "tcp://b:5560"], "tcp://c:5557", admin_key, control_key=engine_key)
    results = cluster.generate(sessions, placement=[[0, 1], ...])  # participant n of session i on engine placement[i][n]

For each session it opens the coordinator session (one credential per participant), sends
each engine only its own participants' segments and credentials, says `go` once every
engine has reserved room (pipelined: all at once; serial: one after another), and
assembles the generators' outputs with the bytes the coordinator counted. A session fails,
alone, when an engine reports an error, dies, or goes silent for `timeout_s`; its K/V is
then freed everywhere (coordinator close, engine aborts).
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import zmq

from fedattn_vllm.config import FedAttnConfigError, FedAttnPlan
from fedattn_vllm.session import (FedAttnSession, FedAttnSessionError, GeneratorOutput, Piece, SessionCost,
                                  SessionResult)
from fedattn_vllm.federated.client import CoordinatorError, SessionAdmin
from fedattn_vllm.federated.curve import OrchestratorKeys
from fedattn_vllm.federated.link import EngineLink, EngineUnavailable
from fedattn_vllm.federated.sealing import new_seal_key

log = logging.getLogger(__name__)


MAX_RESTARTS = 3  # a local engine that dies is restarted this many times, then left down
PieceCallback = Callable[[int, Piece], None]  # (generator, what it added since the last call)


class EngineLauncher(Protocol):
    """Local engine processes (LocalCluster): watched, and restarted when they die."""

    def process(self, engine: int) -> subprocess.Popen: ...

    def relaunch(self, engine: int) -> None:
        """Start a fresh process for `engine` (returns at once; `ready_endpoint` says when it serves)."""

    def ready_endpoint(self, engine: int) -> str | None:
        """The relaunched engine's endpoint once it serves, else None; raises if it died starting."""

    @property
    def coordinator_process(self) -> subprocess.Popen | None:
        """The local coordinator (None: not ours to watch)."""

    def relaunch_coordinator(self) -> None:
        """Start a fresh coordinator on the same endpoint (engines reconnect to it by themselves)."""

    def coordinator_ready(self) -> bool:
        """Whether the relaunched coordinator listens."""


@dataclass
class _Flight:
    """One session between submission and its result."""

    session_id: str
    plan: FedAttnPlan
    hosts: dict[int, list[int]]  # engine -> the participants it hosts
    started: float = field(default_factory=time.monotonic)
    lengths: dict[int, int] = field(default_factory=dict)
    prefix_lens: set[int] = field(default_factory=set)  # the public prefix's length as each engine encoded it
    ready: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    outputs: dict[int, GeneratorOutput] = field(default_factory=dict)
    serial_order: list[int] = field(default_factory=list)  # engines still to start (serial mode)
    error: str | None = None
    error_field: str | None = None
    result: SessionResult | None = None
    on_piece: PieceCallback | None = None  # a generator's output as its engine reports it (streaming)


class FederatedCluster:
    """Runs sessions on federated engines through one coordinator (one orchestrator per pool of engines)."""

    def __init__(self, engines: Sequence[str], coordinator: str, admin_key: bytes | None, *, control_key: bytes,
                 keys: OrchestratorKeys | None = None, insecure: bool = False, seal: bool = True,
                 timeout_s: float = 60.0, launcher: EngineLauncher | None = None):
        """`timeout_s`: how long a participant waits for a peer's K/V before its session fails.

        An engine blocked in such a wait sends nothing meanwhile, so an engine is declared
        stalled (its sessions failed) only after `2 * timeout_s + 5` s of silence while it owes
        work. `launcher` (optional): the local engine processes, so a death is noticed at once
        and the engine restarted (at most MAX_RESTARTS times each); meanwhile, and for good
        once it gives up, `down` says why and sessions that need the engine fail at once.
        `admin_key`: the coordinator's key for opening sessions (None: this orchestrator opens none, a party site).
        `keys`: CURVE on every link (curve.py); plaintext only with `insecure=True`. `seal`: each
        session's K/V sealed end to end between its engines, unreadable to the coordinator (sealing.py).
        """
        if not engines:
            raise ValueError("engines: at least one engine endpoint")
        if keys is None and not insecure:
            raise ValueError("keys: encrypted links need the orchestrator's keypair and its peers' public keys "
                             "(or insecure=True for plaintext on loopback)")
        if keys is not None and len(keys.engines) != len(engines):
            raise ValueError(f"keys: {len(keys.engines)} engine public keys for {len(engines)} engines")
        self._control_key = control_key
        self._keys = keys
        self.seal = seal
        self.links = [self._link(e, endpoint) for e, endpoint in enumerate(engines)]
        self.launcher = launcher
        self.timeout_s = timeout_s
        self.silence_s = 2 * timeout_s + 5.0
        self.coordinator = coordinator
        self.admin = admin_key and SessionAdmin(coordinator, admin_key, curve=keys and keys.to_coordinator())
        infos = [link.request("info", timeout_s) for link in self.links]
        models = {(info["model"], info["num_layers"]) for info in infos}
        if len(models) != 1:
            raise ValueError(f"engines serve different models: {sorted(models)}")
        self.model, self.num_layers = models.pop()
        self.engine_pids = [info["pid"] for info in infos]
        self.down: dict[int, str] = {}  # engine -> why it cannot take sessions now
        self.restarts = [0] * len(engines)
        self.coordinator_restarts = 0
        self.coordinator_down: str | None = None  # why, while a local coordinator restarts or once it died for good
        self._coordinator_restarting = False
        self.gave_up: set[int] = set()  # engines that died more than MAX_RESTARTS times
        self._last_heard = [time.monotonic()] * len(engines)
        self._wave: dict[int, list[dict]] = {}  # engine -> sessions to start in the next wave
        self._flights: dict[str, _Flight] = {}  # sessions submitted and not yet reported by `poll`
        self._poller = zmq.Poller()
        for link in self.links:
            self._poller.register(link.socket, zmq.POLLIN)

    def _link(self, e: int, endpoint: str) -> EngineLink:
        return EngineLink(endpoint, control_key=self._control_key, curve=self._keys and self._keys.to_engine(e))

    # -- validation ------------------------------------------------------------------------
    def _check(self, i: int, session: FedAttnSession, placement: Sequence[int] | None, pipelined: bool):
        if not isinstance(session, FedAttnSession):
            raise FedAttnSessionError(f"sessions[{i}]", f"expected a FedAttnSession, got {type(session).__name__}")
        if isinstance(session.segments, (str, bytes)) or not session.segments:
            raise FedAttnSessionError("segments", "a session needs a list of at least one participant segment")
        from vllm import SamplingParams

        if session.sampling_params is not None and not isinstance(session.sampling_params, SamplingParams):
            raise FedAttnSessionError("sampling_params", f"expected vllm.SamplingParams, got "
                                      f"{type(session.sampling_params).__name__}")
        n = len(session.segments)
        for p, segment in enumerate(session.segments):
            if not isinstance(segment, str) and not (
                isinstance(segment, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in segment)
            ):
                raise FedAttnSessionError(f"segments[{p}]", "must be text or a list of token ids")
        plan = session.config.resolve(self.num_layers, n)
        engines = list(placement) if placement is not None else [p % len(self.links) for p in range(n)]
        if len(engines) != n or not all(isinstance(e, int) and 0 <= e < len(self.links) for e in engines):
            raise FedAttnSessionError(f"placement[{i}]", f"one engine index in 0..{len(self.links) - 1} per participant")
        if not pipelined and (len(set(engines)) != n or plan.generators != (n - 1,)):
            raise FedAttnSessionError(f"placement[{i}]", "serial mode runs one participant per engine, the last generating")
        if not pipelined and plan.selection_needs_queries:  # the publishers would wait for a generator not yet started
            raise FedAttnConfigError("kv_selection", "'question' needs the generators running beside the publishers "
                                     "(pipelined mode): serial mode starts them last")
        hosts: dict[int, list[int]] = {}
        for participant, engine in enumerate(engines):
            hosts.setdefault(engine, []).append(participant)
        return plan, hosts

    # -- running ---------------------------------------------------------------------------
    def generate(self, sessions: Sequence[FedAttnSession], placement: Sequence[Sequence[int]] | None = None, *,
                 pipelined: bool = True) -> list[SessionResult]:
        """Run every session; one result per session, in order. A failed session has `error` set."""
        if placement is not None and len(placement) != len(sessions):
            raise FedAttnSessionError("placement", "one engine assignment per session")
        checked = [self._check(i, s, placement[i] if placement else None, pipelined) for i, s in enumerate(sessions)]
        order = []
        try:
            for session, (plan, hosts) in zip(sessions, checked):  # submission order is the global session order
                order.append(self._submit(session, plan, hosts, pipelined).session_id)
            results: dict[str, SessionResult] = {}
            while len(results) < len(order):
                results.update((i, r) for i, r in self.poll().items() if i in order)
        finally:
            for session_id in order:  # an exception left these behind
                self.abort(session_id, "the orchestrator stopped")
        return [results[s] for s in order]

    def submit(self, session: FedAttnSession, placement: Sequence[int] | None = None, *,
               on_piece: PieceCallback | None = None) -> str:
        """Start one session (pipelined); `poll` reports its result, and meanwhile calls `on_piece` with each
        generator's new output as its engine generates it. Returns its id."""
        plan, hosts = self._check(0, session, placement, True)
        flight = self._submit(session, plan, hosts, True)
        flight.on_piece = on_piece
        return flight.session_id

    def poll(self, timeout_ms: int = 100) -> dict[str, SessionResult]:
        """Handle the engines' news for up to `timeout_ms`; the sessions that ended, by id."""
        self._poller.poll(timeout_ms)
        for e, link in enumerate(self.links):
            for event in link.receive():
                try:
                    self._on_event(e, event)
                except (KeyError, TypeError, ValueError, AttributeError) as error:  # an event that is not what it says
                    flight = self._flights.get(str(event.get("session")))
                    if flight is not None and flight.result is None:
                        self._fail(flight, f"engine {e} sent a malformed event: {error!r}")
        self._send_wave()
        self.maintain()
        ended = {i: f.result for i, f in self._flights.items() if f.result is not None}
        for session_id in ended:
            del self._flights[session_id]
        return ended

    def abort(self, session_id: str, why: str = "cancelled") -> None:
        """Fail a running session (no-op if it already ended); `poll` reports it."""
        flight = self._flights.get(session_id)
        if flight is not None and flight.result is None:
            self._fail(flight, why)

    def _submit(self, session: FedAttnSession, plan: FedAttnPlan, hosts: dict[int, list[int]], pipelined: bool):
        session_id = f"fedattn-{uuid.uuid4().hex}"
        down = sorted(set(hosts) & set(self.down))
        if down or self.coordinator_down:  # fails at once: `poll` reports it
            flight = self._flights[session_id] = _Flight(session_id, plan, hosts)
            why = self.coordinator_down or f"engine {down[0]} is down: {self.down[down[0]]}"
            flight.result = SessionResult(outputs={}, cost=self._cost(flight, None), error=why)
            return flight
        credentials = self.admin.open(session_id, plan)
        flight = self._flights[session_id] = _Flight(session_id, plan, hosts)
        if not pipelined:
            flight.serial_order = sorted(hosts, key=lambda e: hosts[e][0])
        seal_key = new_seal_key() if self.seal else None  # to the session's engines only, never the coordinator
        for engine, participants in hosts.items():
            self._send_submit(flight, engine, session, {n: credentials[n] for n in participants}, seal_key)
        return flight

    def _send_submit(self, flight: _Flight, engine: int, session: FedAttnSession, credentials: dict[int, bytes | None],
                     seal_key: bytes | None) -> None:
        """Hand `engine` its participants of the session (those of `credentials`; None: bound to its CURVE key)."""
        if self._owed(engine) == [flight]:
            self._last_heard[engine] = time.monotonic()  # its silence counts from now
        sampling = session.sampling_params
        self.links[engine].send({
            "op": "submit", "session": flight.session_id, "num_participants": flight.plan.num_participants,
            "segments": {n: _plain(session.segments[n]) for n in credentials}, "credentials": credentials,
            "public_prefix": _plain(session.public_prefix) if session.public_prefix is not None else None,
            "config": session.config.to_dict(), "sampling": msgspec.msgpack.encode(sampling),
            "wait_s": self.timeout_s, "seal_key": seal_key,
        })

    @staticmethod
    def _generated(flight: _Flight, engine: int, outputs: dict) -> dict:
        """An engine's outputs by generator, each one a generator that engine hosts (ValueError otherwise)."""
        hosted = {int(g): out for g, out in outputs.items()}
        if strangers := [g for g in hosted if g not in flight.plan.generators or g not in flight.hosts[engine]]:
            raise ValueError(f"engine {engine} reported output for participants {strangers}, which it does not "
                             "host as generators")
        return hosted

    @staticmethod
    def _hand_on(flight: _Flight, generator: int, piece: Piece) -> None:
        """Give a generator's new output to the session's `on_piece`; its failure is the caller's, not the engine's."""
        try:
            flight.on_piece(generator, piece)
        except Exception:
            log.exception("the text callback of session %s failed", flight.session_id)

    def _on_event(self, engine: int, event: dict) -> None:
        self._last_heard[engine] = time.monotonic()
        flight = self._flights.get(str(event.get("session")))
        if flight is None or flight.result is not None:
            return  # heartbeats, and late news of sessions already settled
        kind = event.get("event")
        if kind == "ready":
            flight.ready.add(engine)
            flight.lengths.update({int(n): length for n, length in event["lengths"].items()})
            flight.prefix_lens.add(int(event["prefix_len"]))
            if len(flight.prefix_lens) > 1:  # engines with different tokenizers would shift every position
                self._fail(flight, f"engines encoded the public prefix differently ({sorted(flight.prefix_lens)} tokens)")
                return
            if len(flight.ready) == len(flight.hosts):
                self._on_ready(flight)
        elif kind == "tokens":
            pieces = {g: Piece.from_wire(piece) for g, piece in self._generated(flight, engine,
                                                                                  event["outputs"]).items()}
            if flight.on_piece is not None:
                for g, piece in pieces.items():
                    self._hand_on(flight, g, piece)
        elif kind == "done":
            if event.get("error"):
                flight.error_field = event.get("field")
                self._fail(flight, f"engine {engine}: {event['error']}")
                return
            flight.done.add(engine)
            for g, out in self._generated(flight, engine, event["outputs"]).items():
                whole = Piece.from_wire(out)  # text, token ids and logprobs checked
                if not isinstance(out.get("finish_reason"), (str, type(None))):
                    raise ValueError(f"finish_reason of participant {g} is not a string")
                flight.outputs[g] = GeneratorOutput(g, whole.text, whole.token_ids, out["finish_reason"], whole.logprobs)
            if flight.serial_order:
                flight.serial_order.pop(0)
                if flight.serial_order:
                    self._go(flight, flight.serial_order[0])
            if len(flight.done) == len(flight.hosts):
                self._complete(flight)

    def _on_ready(self, flight: _Flight) -> None:
        """Every engine of the session has reserved room and reported its lengths: start it."""
        for e in (flight.serial_order[:1] if flight.serial_order else flight.hosts):
            self._go(flight, e)

    def _go(self, flight: _Flight, engine: int) -> None:
        """Start the session on `engine` with the next wave."""
        lengths = [flight.lengths[n] for n in range(len(flight.lengths))]
        self._wave.setdefault(engine, []).append({"session": flight.session_id, "lengths": lengths})

    def _send_wave(self) -> None:
        """One `go` per engine for every session that became startable since the last wave.

        Every engine starts the waves it receives in this order, one per engine step, so a
        session's participants begin in the same wave everywhere (docs/federated.md).
        """
        for engine, sessions in self._wave.items():
            self.links[engine].send({"op": "go", "sessions": sessions})
        self._wave.clear()

    def _owed(self, engine: int) -> list[_Flight]:
        """Unsettled sessions still waiting for news from `engine`."""
        return [f for f in self._flights.values() if f.result is None and engine in f.hosts and engine not in f.done]

    def maintain(self) -> None:
        """Fail the sessions of an engine that died, or was silent for `silence_s` while owing work; restart
        local engines that died and reconnect the ones that came back (call it often, idle or not)."""
        now = time.monotonic()
        self._watch_coordinator()
        for e in range(len(self.links)):
            if e in self.down:
                self._await_restart(e)
                continue
            owed = self._owed(e)
            process = self.launcher.process(e) if self.launcher else None
            if process is not None and process.poll() is not None:
                why = f"engine {e} exited (code {process.returncode})"
                self._restart(e, why)
            elif owed and now - self._last_heard[e] > self.silence_s:
                why = f"engine {e} sent nothing for {self.silence_s:.0f} s (stalled or unreachable)"
            else:
                continue
            for flight in owed:
                self._fail(flight, why)

    def _watch_coordinator(self) -> None:
        """A local coordinator that died took every open session with it: restart it, fail them all.
        `coordinator_down` says so (sessions fail at once, /health is 503) until the new one listens."""
        process = self.launcher.coordinator_process if self.launcher else None
        if process is None:
            return
        if process.poll() is None:
            if self._coordinator_restarting and self.launcher.coordinator_ready():
                self._coordinator_restarting = False
                self.coordinator_down = None
                log.warning("the coordinator is back (pid %d)", process.pid)
            return
        why = f"the coordinator exited (code {process.returncode})"
        if self.coordinator_restarts >= MAX_RESTARTS:
            if self._coordinator_restarting or self.coordinator_down is None:
                self._coordinator_restarting = False
                self.coordinator_down = f"{why}; not restarted again after {MAX_RESTARTS} restarts"
                log.error("%s", self.coordinator_down)
            return
        self.coordinator_restarts += 1
        self.coordinator_down = f"{why}; restarting (restart {self.coordinator_restarts} of {MAX_RESTARTS})"
        self._coordinator_restarting = True
        log.warning("%s", self.coordinator_down)
        self.launcher.relaunch_coordinator()  # first: the new one answers the sessions' release at once
        for flight in [f for f in self._flights.values() if f.result is None]:
            self._fail(flight, why)

    def _restart(self, e: int, why: str) -> None:
        if self.restarts[e] >= MAX_RESTARTS:
            self.gave_up.add(e)
            self.down[e] = f"{why}; not restarted again after {MAX_RESTARTS} restarts"
            log.error("engine %d is down for good: %s", e, self.down[e])
            return
        self.restarts[e] += 1
        self.down[e] = f"{why}; restarting (restart {self.restarts[e]} of {MAX_RESTARTS})"
        log.warning("engine %d: %s", e, self.down[e])
        self.launcher.relaunch(e)

    def _await_restart(self, e: int) -> None:
        """Reconnect engine `e` once its new process serves (the same model); a failed start counts as a death."""
        if e in self.gave_up:
            return
        link = None
        try:
            endpoint = self.launcher.ready_endpoint(e)
            if endpoint is None:
                return
            link = self._link(e, endpoint)
            info = link.request("info", self.timeout_s)
        except Exception as error:  # it died while starting, or does not answer
            if link is not None:
                link.close()
            return self._restart(e, f"engine {e} failed to restart: {error}")
        if (info["model"], info["num_layers"]) != (self.model, self.num_layers):
            link.close()
            return self._restart(e, f"engine {e} came back serving {info['model']}, not {self.model}")
        self._poller.unregister(self.links[e].socket)
        self.links[e].close()
        self.links[e] = link
        self._poller.register(link.socket, zmq.POLLIN)
        self.engine_pids[e] = info["pid"]
        self._last_heard[e] = time.monotonic()
        del self.down[e]
        log.warning("engine %d is back (pid %d)", e, info["pid"])

    def _complete(self, flight: _Flight) -> None:
        try:
            stats = self._release(flight, None)
        except CoordinatorError as error:  # the coordinator lost the session (expired, restarted): no bytes to report
            self._fail(flight, f"the coordinator: {error}")
            return
        flight.result = SessionResult(outputs=dict(sorted(flight.outputs.items())), cost=self._cost(flight, stats),
                                      wall_s=time.monotonic() - flight.started)

    def _fail(self, flight: _Flight, why: str) -> None:
        """Settle the session as failed and free it everywhere: coordinator first (waiters fail fast), then engines."""
        try:
            stats = self._release(flight, why)
        except CoordinatorError:
            stats = None
        for e in flight.hosts:
            if e not in flight.done:
                self.links[e].send({"op": "abort", "session": flight.session_id})
        flight.result = SessionResult(outputs={}, cost=self._cost(flight, stats), error=why,
                                      error_field=flight.error_field, wall_s=time.monotonic() - flight.started)

    def _release(self, flight: _Flight, failed: str | None) -> dict:
        """The session's byte counts from the coordinator, which then frees it (raises CoordinatorError if it
        has lost it already)."""
        stats = self.admin.stats(flight.session_id)
        try:
            self.admin.close(flight.session_id)
        except CoordinatorError:
            pass  # expired in between; nothing of it is left there
        return stats

    def _cost(self, flight: _Flight, stats: dict | None) -> SessionCost:
        n = flight.plan.num_participants
        stats = stats or {"wire_bytes": {"up": {}, "down": {}}, "payload_bytes": {"up": {}, "down": {}}}

        def column(kind: str, direction: str) -> list[int]:
            counts = {int(k): v for k, v in stats[kind][direction].items()}
            return [counts.get(p, 0) for p in range(n)]

        return SessionCost(
            tokens=[flight.lengths.get(p, 0) for p in range(n)], sync_layers=flight.plan.sync_layers,
            published_bytes=column("payload_bytes", "up"), received_bytes=column("payload_bytes", "down"),
            prefix_tokens=min(flight.prefix_lens, default=0),
            published_wire_bytes=column("wire_bytes", "up"), received_wire_bytes=column("wire_bytes", "down"),
        )

    # -- management ------------------------------------------------------------------------
    def status(self, engines: Sequence[int] | None = None) -> list[dict]:
        """Each engine's holdings (queued/reserved sessions, worker state, credentials, requests)."""
        return [self.links[e].request("status", self.timeout_s) for e in (engines or range(len(self.links)))]

    def holdings(self, timeout_s: float = 2.0) -> dict:
        """What every engine and the coordinator hold now, counts only (one that is down, or silent for
        `timeout_s`: why). The engines are asked at once; the whole reading takes at most 2 x `timeout_s`."""
        asked = {e: link.ask("status") for e, link in enumerate(self.links) if e not in self.down}
        deadline = time.monotonic() + timeout_s
        engines = []
        for e, link in enumerate(self.links):
            if e in self.down:
                engines.append({"error": self.down[e]})
                continue
            try:
                status = link.reply(asked[e], "status", deadline)
            except EngineUnavailable as error:
                engines.append({"error": str(error)})
                continue
            engines.append({k: v for k, v in status.items() if k not in ("event", "ref")})
        if not self.admin:
            return {"engines": engines}
        if self.coordinator_down:
            return {"engines": engines, "coordinator": {"error": self.coordinator_down}}
        try:
            coordinator = self.admin.counters(timeout_s)
        except CoordinatorError as error:
            coordinator = {"error": str(error)}
        return {"engines": engines, "coordinator": coordinator}

    def close(self) -> None:
        for link in self.links:
            link.close()


def _plain(segment):
    """A segment as msgpack-able data: text stays text, token ids become a list."""
    return segment if isinstance(segment, str) else list(segment)
