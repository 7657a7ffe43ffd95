"""A federated engine: one vLLM engine hosting some participants' segments, driven by the orchestrator.

    python -m fedattn_vllm.federated.engine --model default --coordinator tcp://10.0.0.1:5557 \\
        --bind tcp://0.0.0.0:5560 --keypair keys/engine-a.key_secret --trust keys/peers \\
        --coordinator-key keys/peers/coordinator.key

Control messages (msgpack headers on a ZeroMQ ROUTER socket; docs/federated.md lists them):
the orchestrator `submit`s the part of a session this engine hosts (segments, the hosted
participants' coordinator credentials, config, sampling), then says `go` with every
participant's segment length, or `abort`. Every command carries the control key
(FEDATTN_ENGINE_KEY); one that is malformed (messages.py) or unauthenticated is dropped
unanswered and counted. The engine answers `ready` once it has
reserved room for a submitted session (strictly in submission order: the deadlock-freedom
rule in docs/federated.md), `tokens` with its generators' new text after each step,
`done` when its participants finish or fail, and `alive`
every second while it holds work. Segments never leave this process; only sync-layer
K/V does, through the coordinator.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import json
import logging
import os
import time
from pathlib import Path

import msgspec
import zmq

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError
from fedattn_vllm.driver import SessionDriver
from fedattn_vllm.engine import FederatedLLM
from fedattn_vllm.session import FedAttnSessionError, logprobs_to_wire
from fedattn_vllm.federated import curve as link_security
from fedattn_vllm.federated import messages as m
from fedattn_vllm.federated.client import NetworkKVExchange
from fedattn_vllm.federated.coordinator import write_ready_file
from fedattn_vllm.federated.curve import ClientCurve, ServerCurve, bind_or_close
from fedattn_vllm.federated.lifeline import exit_with_parent
from fedattn_vllm.federated.ranks import HeadShards, RankExchange, RankGateway
from fedattn_vllm.federated.stall import StepWatch
from fedattn_vllm.federated.wire import Dropped, WireError, decode, encode
from fedattn_vllm.vllm_ext.sessions import REGISTRY
from fedattn_vllm.vllm_ext.surface import run_eager

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
MAX_CONSECUTIVE_FAILURES = 3  # failed rounds in a row after which the engine process exits
MAX_COMMAND_BYTES = 64 << 20  # a submit carries the hosted segments (text or ids) and the public prefix
STEP_REPORT_S = 60.0  # a step running this long has every thread's stack logged (stall.py)


class EngineServer:
    """Serves one FederatedLLM to the orchestrator; `serve_forever` runs the engine loop."""

    def __init__(self, llm: FederatedLLM, bind: str, coordinator: str, *, control_key: bytes,
                 curve: ServerCurve | None = None, coordinator_curve: ClientCurve | None = None):
        """`curve`: the control socket's keys and whom it admits; `coordinator_curve`: the link to the
        coordinator (None: plaintext)."""
        self.llm = llm
        self.exchange = NetworkKVExchange(coordinator, curve=coordinator_curve)
        self.gateway = None
        if llm.tensor_parallel_size == 1:
            REGISTRY.exchange = self.exchange  # this process's sync-layer hook publishes and fetches through it
        else:  # each rank's hook goes through the gateway, which joins and splits the ranks' heads
            self.gateway = RankGateway(self.exchange, HeadShards(llm.tensor_parallel_size, llm.num_heads,
                                                                 llm.num_kv_heads))
            llm.workers.install_exchange(functools.partial(RankExchange, self.gateway.endpoints))
        self._control_key = control_key
        self._context = zmq.Context()
        self._authenticator = curve.start(self._context) if curve is not None else None
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_COMMAND_BYTES)
        if curve is not None:
            curve.apply(self._socket)
        bind_or_close(self._socket, bind, self._authenticator)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.driver = SessionDriver(llm)
        self._orchestrators: dict[str, bytes] = {}  # session -> the orchestrator that submitted it
        self._last_beat = 0.0
        self._step_watch: StepWatch | None = None  # while serving
        self.dropped = Dropped(__name__)  # control messages dropped unanswered, by reason
        self._stop = False

    # -- the loop ----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """The engine loop. A round that raises fails the sessions this engine holds, and the loop goes on;
        after MAX_CONSECUTIVE_FAILURES such rounds the engine exits (a local launcher restarts it)."""
        failures = 0
        self._step_watch = StepWatch(STEP_REPORT_S)
        try:
            while not self._stop:
                try:
                    self._round()
                    failures = 0
                except Exception as error:
                    failures += 1
                    log.exception("engine round failed (%d in a row); failing the sessions it held", failures)
                    self._fail_all(f"engine error: {type(error).__name__}: {error}")
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        raise
        finally:
            self._step_watch.close()
            self.driver.fail_all("engine shutting down")
            self._socket.close(0)
            if self._authenticator is not None:
                self._authenticator.stop()
            self._context.term()
            if self.gateway is not None:
                self.gateway.close()

    def _round(self) -> None:
        self._receive(timeout_ms=0 if self.driver.stepping else 100)
        with self._step_watch.step():
            progress = self.driver.advance()
        for run in progress.reserved:
            log.debug("session %s reserved (participants %s)", run.session_id, list(run.prompts))
            self._send(self._orchestrators[run.session_id], {
                "event": "ready", "session": run.session_id, "prefix_len": len(run.prefix),
                "lengths": {n: len(p) for n, p in run.prompts.items()}})
        for run, result in progress.finished:
            self._done(run, result)
        for session_id, pieces in progress.pieces.items():  # a finished session's output goes whole with `done`
            if session_id in self._orchestrators:
                self._send(self._orchestrators[session_id], {"event": "tokens", "session": session_id, "outputs": {
                    g: piece.to_wire() for g, piece in pieces.items()}})
        self._heartbeat()

    def _fail_all(self, why: str) -> None:
        """Settle every session this engine holds as failed (its orchestrator learns it from `done`)."""
        for run, result in self.driver.fail_all(why):
            self._done(run, result)

    def _receive(self, timeout_ms: int) -> None:
        if not self._socket.poll(timeout_ms):
            return
        while self._socket.poll(0):
            identity, *frames = self._socket.recv_multipart()
            try:
                command, _ = decode(frames, m.EngineCommand, max_header_bytes=MAX_COMMAND_BYTES)
            except WireError as error:
                self.dropped.drop("malformed", str(error))
                continue
            if not hmac.compare_digest(command.key, self._control_key):
                self.dropped.drop("unauthenticated", type(command).__name__)
                continue
            self._handle(identity, command)

    def _send(self, identity: bytes, header: dict) -> None:
        self._socket.send_multipart([identity, *encode(header)])

    def _handle(self, identity: bytes, command) -> None:
        if isinstance(command, m.Submit):
            self._submit(identity, command)
        elif isinstance(command, m.Go):
            self.driver.go([(item.session, item.lengths) for item in command.sessions])
        elif isinstance(command, m.Abort):
            self._abort(command.session)
        elif isinstance(command, m.Info):
            self._send(identity, {"event": "info", "ref": command.ref, "num_layers": self.llm.num_layers,
                                  "model": Path(self.llm.model_path).name, "max_model_len": self.llm.max_model_len,
                                  "pid": os.getpid()})
        elif isinstance(command, m.Status):
            self._send(identity, {"event": "status", "ref": command.ref, **self.status()})
        else:  # m.Shutdown
            self._stop = True

    # -- sessions ----------------------------------------------------------------------------
    def _submit(self, identity: bytes, command: m.Submit) -> None:
        from vllm import SamplingParams

        session_id = command.session
        try:
            if session_id in self.driver:
                raise FedAttnSessionError("session", f"{session_id} was already submitted")
            hosted = set(command.segments)
            if hosted != set(command.credentials) or max(hosted) >= command.num_participants:
                raise FedAttnSessionError("segments", "one credential per hosted participant, each < num_participants")
            try:
                config = FedAttnConfig(**command.config)
            except TypeError as error:
                raise FedAttnSessionError("config", str(error)) from None
            try:
                sampling = msgspec.msgpack.decode(command.sampling, type=SamplingParams | None)
            except (msgspec.DecodeError, ValueError, TypeError) as error:
                raise FedAttnSessionError("sampling_params", str(error)) from None
            prompts = {n: self.llm.encode(segment, f"segments[{n}]") for n, segment in command.segments.items()}
            prefix = self.llm.encode_prefix(command.public_prefix)
            run = self.llm.plan_run(session_id, prompts, command.num_participants, config, sampling, prefix)
        except (FedAttnSessionError, FedAttnConfigError) as error:
            self._send(identity, {"event": "done", "session": session_id, "error": str(error),
                                  "field": getattr(error, "field", None)})
            return
        for n, credential in command.credentials.items():
            self.exchange.join(session_id, n, credential, wait_s=command.wait_s, seal_key=command.seal_key)
        self.driver.submit(run)  # reserved in submission order, started at its `go`
        self._orchestrators[session_id] = identity

    def _abort(self, session_id: str) -> None:
        """Drop the session wherever it is; its K/V and credentials go with it (the orchestrator asked: no `done`)."""
        self.driver.abort(session_id, "aborted")
        self._orchestrators.pop(session_id, None)

    def _done(self, run, result) -> None:
        identity = self._orchestrators.pop(run.session_id)
        log.debug("session %s done%s", run.session_id, f": {result.error}" if result.error else "")
        self._send(identity, {
            "event": "done", "session": run.session_id, "error": result.error,
            "outputs": {g: {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                            "logprobs": logprobs_to_wire(o.logprobs)} for g, o in result.outputs.items()},
        })

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat < HEARTBEAT_S:
            return
        self._last_beat = now
        for identity in set(self._orchestrators.values()):
            self._send(identity, {"event": "alive"})

    def status(self) -> dict:
        """What this engine holds: queued and reserved sessions, worker session state, credentials, requests."""
        return {"queued": self.driver.queued, "runs": self.driver.held, **self.llm.holdings(),
                "credentials": self.exchange.joined_sessions(), "dropped": dict(self.dropped),
                **({"rank_slots": self.gateway.pending()} if self.gateway is not None else {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedattn_vllm.federated.engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model alias, local directory or hub id")
    parser.add_argument("--coordinator", required=True, help="the coordinator's ZeroMQ endpoint")
    parser.add_argument("--bind", default="tcp://127.0.0.1:*", help="control endpoint for the orchestrator")
    parser.add_argument("--engine-args", default="{}", help="vLLM engine arguments as a JSON object")
    parser.add_argument("--ready-file", type=Path, help="write the bound endpoint here once serving")
    parser.add_argument("--parent-pid", type=int, help="terminate when this process (the launcher) exits")
    link_security.add_arguments(parser, serves=True, coordinator_client=True)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    logging.basicConfig(level=os.environ.get("FEDATTN_LOG_LEVEL", "INFO"))
    key = os.environ.get("FEDATTN_ENGINE_KEY")
    if not key:
        parser.error("set FEDATTN_ENGINE_KEY (the orchestrator's secret for this engine's control socket)")
    curve = link_security.server_curve(args, parser)
    coordinator_curve = link_security.coordinator_client_curve(args, parser)
    run_eager()  # this process is the engine's: nothing compiles inside a step that other parties wait on
    llm = FederatedLLM(args.model, **json.loads(args.engine_args))
    server = EngineServer(llm, args.bind, args.coordinator, control_key=key.encode(), curve=curve,
                          coordinator_curve=coordinator_curve)
    log.info("fedattn engine serving %s on %s (%s)", Path(llm.model_path).name, server.endpoint,
             "plaintext: --insecure" if curve is None else f"CURVE, trusting the keys in {args.trust}")
    if args.ready_file:
        write_ready_file(args.ready_file, server.endpoint)
    server.serve_forever()


if __name__ == "__main__":
    main()
