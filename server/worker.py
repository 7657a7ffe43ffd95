"""The engine thread: the only thread that touches the engine; request handlers talk to it through a queue.

Handlers `submit` a whole session (segments as token ids) and get a Future for its
result; a generator's output can be streamed through `on_piece`. Nothing a session does can
stop the thread: an error is its session's alone where it can be told apart (admission,
start), else it fails the sessions in flight; after MAX_CONSECUTIVE_FAILURES failed
rounds in a row the engine is declared dead (`dead` says why; /health turns 503 and new
sessions are refused at once). Two backends:
  EngineWorker   colocated: one in-process FederatedLLM, sessions admitted whole in order;
  ClusterWorker  federated: engine processes behind the orchestrator (FederatedCluster);
                 each engine holds only its participants. Text arrives whole at the end.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from fedattn_vllm.driver import SessionDriver
from fedattn_vllm.engine import FederatedLLM
from fedattn_vllm.session import FedAttnSession, Piece, SessionCost, SessionResult

log = logging.getLogger(__name__)
PieceCallback = Callable[[int, Piece], None]  # (generator, its output new since the last call)
MAX_CONSECUTIVE_FAILURES = 3  # failed engine rounds in a row after which the engine counts as dead


class QueueFull(RuntimeError):
    """More sessions are queued or running than the server allows."""


class EngineDead(RuntimeError):
    """The engine failed for good; the server cannot run sessions until it is restarted."""


@dataclass
class Timings:
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # time to the first generated token (federated: as its engine reports it)
    total_s: float | None = None


@dataclass
class _Job:
    session_id: str
    session: FedAttnSession  # segments and public prefix as token ids
    future: Future
    on_piece: PieceCallback | None
    timings: Timings = field(default_factory=Timings)
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # federated: generator -> (characters, tokens)
    handle: str | None = None  # the backend's session id


class _Worker(ABC):
    """The thread, the inbox, the bound on sessions in flight; subclasses drive a backend."""

    def __init__(self, *, max_sessions: int, on_finished: Callable | None = None):
        self.max_sessions = max_sessions
        self._on_finished = on_finished  # (result, timings) -> None, e.g. metrics
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._failures = 0  # consecutive failed rounds of the loop
        self.dead: str | None = None  # why the engine is dead, once it is
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedattn-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Sessions waiting to enter the engine."""
        return 0

    @property
    def running(self) -> int:
        """Sessions in the engine (federated: handed to the cluster)."""
        return len(self._active)

    def health(self) -> str | None:
        """Why sessions cannot run now (None: they can)."""
        return self.dead

    def acquire(self) -> None:
        """Take one of the `max_sessions` slots (QueueFull if none is free); `submit` takes one itself unless held."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        with self._lock:
            if self._outstanding >= self.max_sessions:
                raise QueueFull(f"{self._outstanding} sessions in flight (max_sessions={self.max_sessions})")
            self._outstanding += 1

    def release(self) -> None:
        """Give back a slot: one taken with `acquire` that no session was submitted with, or a settled session's."""
        with self._lock:
            self._outstanding -= 1

    def submit(self, session: FedAttnSession, on_piece: PieceCallback | None = None, *,
               held: bool = False) -> tuple[str, Future, Timings]:
        """Queue a session; `held`: its slot was taken with `acquire` (and is released when it ends)."""
        if held and self.dead is not None:
            self.release()
            raise EngineDead(self.dead)
        if not held:
            self.acquire()
        job = _Job(f"srv-{next(self._ids)}", session, Future(), on_piece)
        self._inbox.put(("submit", job))
        return job.session_id, job.future, job.timings

    def cancel(self, session_id: str) -> None:
        """Drop a session (a client left); its K/V is freed. No-op if it already ended."""
        self._inbox.put(("cancel", session_id))

    def holdings(self) -> Future:
        """What the engine(s) and the coordinator hold now, counts only (read by the engine thread; requests
        that arrive together share one reading)."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        future: Future = Future()
        self._inbox.put(("holdings", future))
        return future

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.dead is not None:
                self._fail_queued()
                continue
            try:
                self._drain(block=self._idle())
                busy = not self._idle()
                self._tick()
                if busy:  # a round that drove the engine without error
                    self._failures = 0
            except Exception as error:  # nothing may stop this thread: fail what is in flight, go on
                self._failures += 1
                log.exception("engine round failed (%d in a row); failing the sessions in flight", self._failures)
                self._fail_in_flight(f"internal error: {type(error).__name__}: {error}")
                if self._failures >= MAX_CONSECUTIVE_FAILURES:
                    self.dead = f"the engine failed {self._failures} times in a row (last: {error!r})"
                    log.error("engine declared dead: %s", self.dead)

    def _drain(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        readers: list[Future] = []  # holdings requests in this batch: one reading for all
        while True:
            kind, payload = message
            if kind == "submit":
                try:
                    self._admit(payload)
                except Exception as error:  # validation: the handler turns it into a 4xx
                    self.release()
                    payload.future.set_exception(error)
            elif kind == "holdings":
                if payload.set_running_or_notify_cancel():  # else its handler gave up waiting
                    readers.append(payload)
            else:
                self._cancel(payload)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
        if readers:
            try:
                holdings = self._holdings()
            except Exception as error:  # a reading that fails is the readers' error, never the engine's
                log.exception("reading what the engines hold failed")
                for reader in readers:
                    reader.set_exception(error)
            else:
                for reader in readers:
                    reader.set_result(holdings)

    def _fail_queued(self) -> None:
        """The engine is dead: whatever still arrives fails at once."""
        while True:
            try:
                kind, payload = self._inbox.get(timeout=0.1)
            except queue.Empty:
                return
            if kind == "submit":
                self.release()
                payload.future.set_exception(EngineDead(self.dead))
            elif kind == "holdings" and payload.set_running_or_notify_cancel():
                payload.set_exception(EngineDead(self.dead))

    def _settle_failed(self, job: _Job, why: str, cleanup: Callable[[], SessionResult] | None = None) -> None:
        """Settle `job` as failed; `cleanup` frees its engine state (a failure there is logged, not raised)."""
        result = None
        if cleanup is not None:
            try:
                result = cleanup()
            except Exception:
                log.exception("freeing a failed session raised")
        if result is None or result.error is None:
            n = len(job.session.segments)
            result = SessionResult({}, SessionCost([len(s) for s in job.session.segments], (), [0] * n, [0] * n),
                                   error=why)
        self._settle(job, result)

    def _settle(self, job: _Job, result: SessionResult) -> None:
        job.timings.total_s = time.perf_counter() - job.timings.submitted
        self.release()
        if self._on_finished is not None:
            self._on_finished(result, job.timings)
        if not job.future.done():
            job.future.set_result(result)

    @abstractmethod
    def _idle(self) -> bool:
        """Nothing to drive: the thread may block on its inbox."""

    @abstractmethod
    def _admit(self, job: _Job) -> None:
        """Validate and enqueue a submitted session (raises on bad input)."""

    @abstractmethod
    def _cancel(self, session_id: str) -> None:
        """Drop the session wherever it is."""

    @abstractmethod
    def _tick(self) -> None:
        """Drive the backend once: start what fits, advance, settle what ended."""

    @abstractmethod
    def _holdings(self) -> dict:
        """What the backend holds now: {"engines": [counts or {"error"}], "coordinator": counts (federated)}."""

    @abstractmethod
    def _fail_in_flight(self, why: str) -> None:
        """A round failed where no single session can be blamed: settle every session it held as failed."""


class EngineWorker(_Worker):
    """Colocated: every session in one in-process vLLM engine (one SessionDriver), streamed token by token."""

    def __init__(self, llm: FederatedLLM, **kwargs):
        self.llm = llm
        self.driver = SessionDriver(llm)
        self._jobs: dict[str, _Job] = {}  # by the engine's session id: queued, reserved or running
        super().__init__(**kwargs)

    @property
    def queue_depth(self) -> int:
        return self.driver.queued

    @property
    def running(self) -> int:
        return self.driver.running

    def _idle(self) -> bool:
        return not self.driver.holding

    def _admit(self, job: _Job) -> None:
        run, lengths = self.llm.prepare(job.session)
        self.driver.submit(run, lengths)
        job.handle = run.session_id
        self._jobs[run.session_id] = job

    def _cancel(self, session_id: str) -> None:
        for run_id in [r for r, job in self._jobs.items() if job.session_id == session_id]:
            if (aborted := self.driver.abort(run_id, "cancelled")) is not None:
                self._settle(self._jobs.pop(run_id), aborted[1])

    def _tick(self) -> None:
        progress = self.driver.advance()
        for run_id, pieces in progress.pieces.items():
            job = self._jobs[run_id]
            if job.timings.first_token_s is None:  # a generator appears once it has a token
                job.timings.first_token_s = time.perf_counter() - job.timings.submitted
            for generator, piece in pieces.items():
                _hand_on(job, generator, piece)
        for run, result in progress.finished:
            self._settle(self._jobs.pop(run.session_id), result)

    def _holdings(self) -> dict:
        return {"engines": [self.llm.holdings()]}

    def _fail_in_flight(self, why: str) -> None:
        for run, result in self.driver.fail_all(why):
            self._settle(self._jobs.pop(run.session_id), result)


class ClusterWorker(_Worker):
    """Federated: participant n of every session on engine n % E; the orchestrator is driven here."""

    def __init__(self, cluster, **kwargs):
        self.cluster = cluster  # fedattn_vllm.federated.cluster.FederatedCluster (its sockets: this thread only)
        self._active: dict[str, _Job] = {}  # by the cluster's session id
        super().__init__(**kwargs)

    def _admit(self, job: _Job) -> None:
        job.handle = self.cluster.submit(job.session, on_piece=lambda g, piece: self._on_piece(job, g, piece))
        self._active[job.handle] = job  # participant n on engine n % E

    def _on_piece(self, job: _Job, generator: int, piece: Piece) -> None:
        """A generator's new output, as its engine reports it after each step."""
        if job.timings.first_token_s is None:
            job.timings.first_token_s = time.perf_counter() - job.timings.submitted
        text, tokens = job.sent.get(generator, (0, 0))
        job.sent[generator] = (text + len(piece.text), tokens + len(piece.token_ids))
        _hand_on(job, generator, piece)

    def _cancel(self, session_id: str) -> None:
        for handle, job in self._active.items():
            if job.session_id == session_id:
                self.cluster.abort(handle)

    def _fail_in_flight(self, why: str) -> None:
        for handle, job in self._active.items():
            self._settle_failed(job, why, lambda: self.cluster.abort(handle, why))
        self._active.clear()

    def _holdings(self) -> dict:
        return self.cluster.holdings()

    def health(self) -> str | None:
        problems = [self.dead, self.cluster.coordinator_down, *self.cluster.down.values()]
        return "; ".join(p for p in problems if p) or None

    def _idle(self) -> bool:
        return not self._active  # the loop still ticks every 0.1 s: engines are watched while idle

    def _tick(self) -> None:
        if not self._active:
            self.cluster.maintain()
            return
        for handle, result in self.cluster.poll(50).items():
            job = self._active.pop(handle, None)
            if job is None:
                continue
            for g, out in result.outputs.items():  # the rest: the last step's output arrives with the result
                if job.timings.first_token_s is None and out.token_ids:
                    job.timings.first_token_s = time.perf_counter() - job.timings.submitted
                _hand_on(job, g, Piece(out.text, out.token_ids, out.logprobs).after(*job.sent.get(g, (0, 0))))
            self._settle(job, result)


def _hand_on(job: _Job, generator: int, piece: Piece) -> None:
    """Give a generator's new output to the job's `on_piece`; a failure there is the client's, never the thread's."""
    if job.on_piece is None:
        return
    try:
        job.on_piece(generator, piece)
    except Exception:
        log.exception("streaming to session %s failed", job.session_id)
