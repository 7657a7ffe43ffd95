"""The orchestrator's connection to one engine's control socket: commands out (with the control key), events in."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

import zmq

from fedattn_vllm.federated.curve import ClientCurve
from fedattn_vllm.federated.wire import WireError, decode, encode

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """An engine did not answer the orchestrator."""


class EngineLink:
    """The orchestrator's connection to one engine: commands out, events in."""

    def __init__(self, endpoint: str, *, control_key: bytes, curve: ClientCurve | None = None):
        """`curve`: the orchestrator's keypair and this engine's public key (None: plaintext)."""
        self.endpoint = endpoint
        self._key = control_key
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(endpoint)
        self.backlog: deque[dict] = deque()  # events that arrived while waiting for a reply
        self._refs = itertools.count()

    def send(self, header: dict) -> None:
        self.socket.send_multipart(encode({**header, "key": self._key}))

    def receive(self) -> list[dict]:
        """Every event waiting (never blocks); one that does not decode is dropped."""
        events = list(self.backlog)
        self.backlog.clear()
        while self.socket.poll(0):
            if (event := self._decode(self.socket.recv_multipart())) is not None:
                events.append(event)
        return events

    def _decode(self, frames: list) -> dict | None:
        try:
            return decode(frames)[0]
        except WireError as error:
            log.warning("engine %s sent a malformed event (%s); dropped", self.endpoint, error)
            return None

    def request(self, op: str, timeout_s: float) -> dict:
        """Send `op` and wait for its reply; other events are kept for `receive`."""
        return self.reply(self.ask(op), op, time.monotonic() + timeout_s)

    def ask(self, op: str) -> int:
        """Send `op` without waiting: the reference its reply will carry (`reply`)."""
        ref = next(self._refs)
        self.send({"op": op, "ref": ref})
        return ref

    def reply(self, ref: int, op: str, deadline: float) -> dict:
        """Wait until `deadline` (time.monotonic()) for the reply to `ref`; other events are kept for `receive`."""
        while (left := deadline - time.monotonic()) > 0 and self.socket.poll(int(left * 1000) + 1):
            event = self._decode(self.socket.recv_multipart())
            if event is None:
                continue
            if event.get("ref") == ref:
                return event
            self.backlog.append(event)
        raise EngineUnavailable(f"engine {self.endpoint} did not answer {op!r} in time")

    def close(self) -> None:
        self.socket.close(0)
