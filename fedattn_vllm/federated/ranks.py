"""A federated engine's tensor-parallel ranks behind its one network exchange.

Under tensor parallelism each rank (a vLLM worker process) computes its own heads' K/V, while the coordinator and
the other parties deal with one participant holding every head, whatever their own parallelism. The engine
process runs a `RankGateway`: a local socket per rank, in a private directory, served by a thread of its own.
Each rank's sync-layer hook publishes and fetches through a `RankExchange` connected to it. The gateway joins the
ranks' shards of a payload along the heads axis (dim 1 of every payload tensor: K/V, their wire encodings and
scales, question queries) into what one device would publish, and splits a fetched payload into each rank's
heads. With more ranks than KV heads vLLM gives several ranks a copy of one KV head: only the lowest of them
contributes it. Every rank gets the same outcome for the same slot (published, fetched, or one error): the ranks
run in lockstep, so a session fails on all of them or on none. (What a rank checks of its own heads alone the
ranks agree on first: `vllm_ext.attention._agreed`.) A rank that still fails a session on its own (a bug)
abandons it at the gateway: the session's open slots and every later call of it fail, on every rank, at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from fedattn_vllm.exchange import KVExchange, KVExchangeError, Payload, PayloadKind
from fedattn_vllm.federated.messages import MAX_WAIT_S
from fedattn_vllm.federated.wire import WireError, decode, encode
from fedattn_vllm.vllm_ext.surface import kv_head_span
from kernels import all_finite

log = logging.getLogger(__name__)
REPLY_MARGIN_S = 30.0  # beyond the longest fetch wait, before a rank gives its gateway up
STALL_REPORT_S = 60.0  # a rank waiting this long on a slot is logged, with the ranks whose shards are in
ABANDON_WAIT_S = 5.0  # the longest a rank waits for its gateway to take note of a session it failed
HOST_CHECK_S = 0.5  # how often a rank waiting on its gateway checks that the engine process is still there


class RankGatewayError(RuntimeError):
    """A rank lost its gateway (the link failed, the engine process is gone, no answer in the longest wait): not one
    session's failure but the engine's, so it is not a KVExchangeError that would fail a session on this rank alone
    and leave the ranks out of step; the step fails instead."""


@dataclass(frozen=True)
class HeadShards:
    """Which heads each of `ranks` tensor-parallel ranks holds (query heads in contiguous blocks; KV heads as
    `surface.kv_head_span` says vLLM splits them)."""

    ranks: int
    heads: int  # query heads (question queries)
    kv_heads: int

    def span(self, rank: int, kind: PayloadKind) -> tuple[int, int]:
        """(first head, heads) of `rank`'s shard of a payload of `kind`."""
        if kind is PayloadKind.QUESTIONS:
            return rank * (self.heads // self.ranks), self.heads // self.ranks
        return kv_head_span(rank, self.ranks, self.kv_heads)

    def contributors(self, kind: PayloadKind) -> list[int]:
        """The ranks whose shards, in rank order, make up a whole payload (a copied KV head counted once)."""
        if kind is PayloadKind.QUESTIONS:
            return list(range(self.ranks))
        return [r for r in range(self.ranks) if r == 0 or self.span(r, kind) != self.span(r - 1, kind)]

    def join(self, shards: dict[int, Payload], kind: PayloadKind) -> Payload:
        for r in self.contributors(kind):
            if any(t.dim() < 2 or t.shape[1] != self.span(r, kind)[1] for t in shards[r]):
                raise KVExchangeError(f"rank {r}'s shard does not hold its {self.span(r, kind)[1]} heads")
        parts = [shards[r] for r in self.contributors(kind)]
        return tuple(torch.cat(tensors, dim=1) for tensors in zip(*parts))

    def checked(self, payload: Payload, kind: PayloadKind) -> Payload:
        """A fetched payload (from another party) with every head and finite values, or KVExchangeError: checked
        here, once, so that every rank fails on it or none does (each rank's own checks see only its heads)."""
        heads = self.heads if kind is PayloadKind.QUESTIONS else self.kv_heads
        if any(t.dim() < 2 or t.shape[1] != heads for t in payload):
            raise KVExchangeError(f"a {kind.noun} payload without {heads} heads on its second axis")
        if any(t.is_floating_point() and not all_finite(t) for t in payload):
            raise KVExchangeError(f"a {kind.noun} payload with values that are not finite")
        return payload

    def split(self, payload: Payload, rank: int, kind: PayloadKind) -> Payload:
        first, count = self.span(rank, kind)
        return tuple(t.narrow(1, first, count).contiguous() for t in payload)


@dataclass
class _Slot:
    """One payload in flight: its shards (a publish's as they arrive, a fetch's one per rank), the outcome every
    rank gets, and the ranks that have taken it (forgotten once all have)."""

    shards: dict[int, Payload] = field(default_factory=dict)
    error: str | None = None
    done: bool = False
    taken: set[int] = field(default_factory=set)


class RankGateway:
    """Serves the ranks of one engine (see the module's docstring); `exchange` is the engine's network exchange."""

    def __init__(self, exchange: KVExchange, shards: HeadShards):
        self.exchange, self.shards = exchange, shards
        self._directory = tempfile.TemporaryDirectory(prefix="fedattn-ranks-")  # mode 0700: this user only
        self.endpoints = [f"ipc://{Path(self._directory.name) / f'rank{r}'}" for r in range(shards.ranks)]
        self._changed = threading.Condition()
        self._slots: dict[tuple, _Slot] = {}
        self._abandoned: dict[str, str] = {}  # session -> why a rank failed it: every rank's next call fails too
        self._stop = threading.Event()
        self._threads = []
        for rank, endpoint in enumerate(self.endpoints):
            socket = zmq.Context.instance().socket(zmq.REP)
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind(endpoint)
            thread = threading.Thread(target=self._serve, args=(rank, socket), name=f"fedattn-rank{rank}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def pending(self) -> int:
        """Payloads some rank still waits on or has yet to take."""
        with self._changed:
            return len(self._slots)

    def close(self) -> None:
        """Stop serving: calls still waiting fail, each thread closes its socket."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self._directory.cleanup()

    def _serve(self, rank: int, socket) -> None:
        try:
            while not self._stop.is_set():
                if not socket.poll(200):
                    continue
                try:
                    header, payload = decode(socket.recv_multipart(copy=False))
                    reply = self._handle(rank, header, payload)
                except KVExchangeError as error:
                    reply = encode({"ok": False, "error": str(error)})
                except Exception as error:  # a malformed request or a bug: that call fails, the thread goes on
                    log.exception("rank %d's request failed", rank)
                    reply = encode({"ok": False, "error": f"rank gateway: {type(error).__name__}: {error}"})
                socket.send_multipart(reply, copy=False)
        finally:
            socket.close(0)

    def _handle(self, rank: int, header: dict, payload: Payload | None) -> list:
        op, session, kind = header["op"], header["session"], PayloadKind(header.get("kind", "kv"))
        if op == "release":
            self._release(session)
            return encode({"ok": True})
        if op == "abandon":
            self._abandon(rank, session, str(header["error"]))
            return encode({"ok": True})
        if op == "publish":
            self._publish(rank, (op, session, header["participant"], header["layer"], kind), payload)
            return encode({"ok": True})
        key = (op, session, header["participant"], header["source"], header["layer"], kind)
        return encode({"ok": True}, self._fetch(rank, key))

    def _publish(self, rank: int, key: tuple, shard: Payload | None) -> None:
        """Wait for every contributor's shard; the last to arrive publishes the whole payload."""
        _, session, participant, layer, kind = key
        contributors = self.shards.contributors(kind)
        with self._changed:
            slot, _ = self._open(key)
            last = False
            if rank in contributors and not slot.done:
                slot.shards[rank] = shard
                last = len(slot.shards) == len(contributors)  # true for exactly one contributor
        if last:
            error = self._publish_whole(session, participant, layer, kind, slot.shards)
            with self._changed:
                if not slot.done:  # else abandoned meanwhile: every rank gets that
                    slot.error = error
                slot.shards, slot.done = {}, True
                self._changed.notify_all()
        self._outcome(rank, key, slot)

    def _publish_whole(self, session: str, participant: int, layer: int, kind: PayloadKind,
                       shards: dict[int, Payload]) -> str | None:
        """Join the shards and publish the payload; the error every rank of the slot gets, or None."""
        try:
            self.exchange.publish(session, participant, layer, self.shards.join(shards, kind), kind)
        except KVExchangeError as error:
            return str(error)
        except Exception as error:  # shards that do not fit together, or a bug: the waiting ranks get it too
            log.exception("publishing the joined shards failed")
            return f"rank gateway: {type(error).__name__}: {error}"
        return None

    def _fetch(self, rank: int, key: tuple) -> Payload:
        """The first rank to ask fetches the whole payload; every rank takes its own heads of it."""
        _, session, viewer, source, layer, kind = key
        with self._changed:
            slot, first = self._open(key)
        if first:
            shards, error = {}, None
            try:
                payload = self.exchange.fetch(session, viewer, source, layer, kind)
                shards = {r: self.shards.split(self.shards.checked(payload, kind), r, kind)
                          for r in range(self.shards.ranks)}
            except KVExchangeError as failure:
                error = str(failure)
            except Exception as failure:  # a bug: the waiting ranks get it too
                log.exception("fetching for the ranks failed")
                error = f"rank gateway: {type(failure).__name__}: {failure}"
            with self._changed:
                if not slot.done:  # else abandoned meanwhile: every rank gets that
                    slot.shards, slot.error = shards, error
                slot.done = True
                self._changed.notify_all()
        self._outcome(rank, key, slot)
        return slot.shards.pop(rank)

    def _open(self, key: tuple) -> tuple[_Slot, bool]:
        """(The key's slot, whether it is new); KVExchangeError where a rank has abandoned its session. Called with
        the lock held, so that a slot is either opened before its session is abandoned (and failed by it) or not
        at all."""
        if key[1] in self._abandoned:
            raise KVExchangeError(self._abandoned[key[1]])
        new = key not in self._slots
        return self._slots.setdefault(key, _Slot()), new

    def _abandon(self, rank: int, session: str, error: str) -> None:
        """A rank failed the session on its own: the session's slots fail now, and so does every later call of it,
        on every rank, instead of stalling the ranks still waiting on this one's shards for the longest wait."""
        with self._changed:
            reason = self._abandoned.setdefault(session, f"rank {rank} failed the session: {error}")
            for key, slot in self._slots.items():
                if key[1] == session and not slot.done:
                    slot.error, slot.done = reason, True
            self._changed.notify_all()

    def _outcome(self, rank: int, key: tuple, slot: _Slot) -> None:
        """Wait until the slot is done; forget it once every rank has seen it; raise its error."""
        start = time.monotonic()
        report = start + STALL_REPORT_S
        with self._changed:  # woken by any slot's change: the clock decides
            while not (slot.done or self._stop.is_set()) \
                    and (now := time.monotonic()) < start + MAX_WAIT_S + REPLY_MARGIN_S:
                if now >= report:  # ranks out of step stall here: say where
                    arrived = f"; shards in from ranks {sorted(slot.shards)}" if key[0] == "publish" else ""
                    log.warning("rank %d has waited %.0f s on %s %s of session %s%s", rank, now - start, key[0],
                                key[2:], key[1], arrived)
                    report += STALL_REPORT_S
                self._changed.wait(min(report, start + MAX_WAIT_S + REPLY_MARGIN_S) - now)
            if not slot.done:  # decided for every rank: a shard arriving later joins nothing
                slot.error, slot.done = f"rank gateway: no outcome for {key[0]} of session {key[1]}", True
                self._changed.notify_all()
            slot.taken.add(rank)
            if len(slot.taken) == self.shards.ranks:
                self._slots.pop(key, None)
        if slot.error is not None:
            raise KVExchangeError(slot.error)

    def _release(self, session: str) -> None:
        with self._changed:
            for key in [k for k in self._slots if k[1] == session]:
                del self._slots[key]
            self._abandoned.pop(session, None)
        self.exchange.release(session)


class RankExchange(KVExchange):
    """A rank's exchange: its shards through the engine's `RankGateway` (a socket used by this rank's one model
    thread). Counts what this rank moves, so that the ranks' counts add up to the whole payloads'."""

    def __init__(self, endpoints: list[str], rank: int, counted: frozenset[PayloadKind] = frozenset(PayloadKind)):
        """endpoints: the gateway's, one per rank; this is `rank`'s."""
        super().__init__(counted)
        self._socket = zmq.Context.instance().socket(zmq.REQ)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.REQ_RELAXED, 1)  # a new request after an unanswered one
        self._socket.setsockopt(zmq.REQ_CORRELATE, 1)  # ... and the late answer to the old one dropped
        self._socket.connect(endpoints[rank])
        self._rank = rank
        self._contributes_kv = PayloadKind.KV in counted  # a copy of another rank's KV heads sends none
        self._host = os.getppid()  # the engine process, which serves the gateway and started this rank

    def _call(self, header: dict, payload: Payload | None = None, wait_s: float | None = None) -> Payload | None:
        """The gateway's answer to one request (wait_s: how long to wait for it; None: the longest wait)."""
        with self._lock:
            try:
                self._socket.send_multipart(encode(header, payload), copy=False)
                self._await_reply(header, MAX_WAIT_S + 2 * REPLY_MARGIN_S if wait_s is None else wait_s)
                reply, tensors = decode(self._socket.recv_multipart(copy=False))
            except (zmq.ZMQError, WireError) as error:
                raise RankGatewayError(f"the engine's rank gateway: {error}") from None
        if not reply.get("ok"):
            raise KVExchangeError(reply.get("error", "refused"))
        return tensors

    def _await_reply(self, header: dict, wait_s: float) -> None:
        """Until the gateway answers: RankGatewayError once the engine process is gone (a rank blocked here must not
        outlive it: vLLM's own watch of its parent acts only between steps) or `wait_s` has passed."""
        start = time.monotonic()
        report = start + STALL_REPORT_S
        while not self._socket.poll(int(1000 * HOST_CHECK_S)):
            if os.getppid() != self._host:
                raise RankGatewayError("the engine process that hosts the rank gateway is gone")
            if (now := time.monotonic()) > start + wait_s:
                raise RankGatewayError("the engine's rank gateway did not answer")
            if now >= report:  # the gateway's own report says whether the call reached it
                log.warning("rank %d has waited %.0f s for its gateway's answer to %s of session %s", self._rank,
                            now - start, header["op"], header["session"])
                report += STALL_REPORT_S

    def publish(self, session: str, participant: int, layer: int, kv: Payload,
                kind: PayloadKind = PayloadKind.KV) -> None:
        contributes = kind is PayloadKind.QUESTIONS or self._contributes_kv
        self._call({"op": "publish", "session": session, "participant": participant, "layer": layer,
                    "kind": kind.value}, kv if contributes else None)
        self._count_published(session, participant, kv, kind)

    def fetch(self, session: str, viewer: int, source: int, layer: int,
              kind: PayloadKind = PayloadKind.KV) -> Payload:
        kv = self._call({"op": "fetch", "session": session, "participant": viewer, "source": source, "layer": layer,
                         "kind": kind.value})
        self._count_received(session, viewer, kv, kind)
        return kv

    def abandon(self, session: str, reason: str) -> None:
        try:  # answered at once by a live gateway: a wait as long as a fetch's would stall the step again
            self._call({"op": "abandon", "session": session, "error": reason}, wait_s=ABANDON_WAIT_S)
        except RankGatewayError as error:  # the gateway is gone: so is every rank's wait on it
            log.warning("could not tell the rank gateway that session %s failed: %s", session, error)

    def release(self, session: str) -> None:
        self._call({"op": "release", "session": session})
        with self._lock:
            self._stats.pop(session, None)
