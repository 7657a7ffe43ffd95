"""The session driver: the one reserve -> start -> step -> finish loop around a FederatedLLM.

Every host of an engine drives its sessions through this class: the offline API
(`FederatedLLM.generate`), the server's engine thread (server/worker.py) and the federated
engine server (federated/engine.py). A session's run goes through four stages:

  queued    submitted, waiting in submission order (never overtaken: gang admission
            and the deadlock-freedom rule of docs/federated.md);
  reserved  its room held (every hosted segment prefills in one step);
  started   its requests in vLLM: at once when every segment length is known at
            submission (colocated), else at `go` (federated: the orchestrator sends every
            participant's length once all engines reserved), one wave per step;
  done      finished or failed; its K/V freed and its result built (`llm.finish`).

`advance()` does one round (reserve, start, step) and reports what happened; nothing a
session does in it (a start the engine refuses) stops the others.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedattn_vllm.session import Piece, SessionCost, SessionResult, SessionRun

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What one `advance()` did."""

    reserved: list[SessionRun] = field(default_factory=list)  # reserved now and waiting for `go` (federated)
    pieces: dict[str, dict[int, Piece]] = field(default_factory=dict)  # session -> generator -> its new output
    finished: list[tuple[SessionRun, SessionResult]] = field(default_factory=list)  # done in this round


@dataclass
class _Entry:
    run: SessionRun
    lengths: list[int] | None  # every participant's segment length (None: known at `go`)
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # generator -> (characters, tokens) reported


class SessionDriver:
    """Queues, reserves, starts and steps one engine's sessions; see the module docstring."""

    def __init__(self, llm):
        self.llm = llm  # fedattn_vllm.engine.FederatedLLM
        self._queue: deque[_Entry] = deque()
        self._held: dict[str, _Entry] = {}  # reserved or started, by session id
        self._waves: deque[list[tuple[str, list[int]]]] = deque()  # go'd sessions with every segment length
        # done and finished, not yet reported: kept here so that a round which raises after settling them
        # loses none (the next advance() or fail_all() reports them)
        self._settled: list[tuple[SessionRun, SessionResult]] = []

    # -- what it holds -----------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held(self) -> int:
        """Sessions reserved or running."""
        return len(self._held)

    @property
    def running(self) -> int:
        """Sessions whose requests are in vLLM (safe to read from another thread)."""
        return self.llm.running

    @property
    def holding(self) -> bool:
        """Anything submitted and not done."""
        return bool(self._queue or self._held)

    @property
    def stepping(self) -> bool:
        """The engine has work for its next step (else the host may block waiting for commands)."""
        return self.llm.busy or bool(self._waves)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._held or any(e.run.session_id == session_id for e in self._queue)

    # -- commands ----------------------------------------------------------------------------
    def submit(self, run: SessionRun, lengths: Sequence[int] | None = None) -> None:
        """Queue a planned run; with `lengths` it starts as soon as it is reserved, else at its `go`."""
        if run.session_id in self:
            raise ValueError(f"session {run.session_id} was already submitted")
        self._queue.append(_Entry(run, None if lengths is None else list(lengths)))

    def go(self, wave: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Start these reserved sessions (with every participant's segment length) together, in a later step."""
        self._waves.append([(session_id, list(lengths)) for session_id, lengths in wave])

    def abort(self, session_id: str, why: str) -> tuple[SessionRun, SessionResult] | None:
        """Drop the session wherever it is; its K/V goes with it. None if this driver does not hold it."""
        entry = self._held.pop(session_id, None)
        if entry is None:
            entry = next((e for e in self._queue if e.run.session_id == session_id), None)
            if entry is None:
                return None
            self._queue.remove(entry)
        return entry.run, self._finish(entry.run, why)

    def fail_all(self, why: str) -> list[tuple[SessionRun, SessionResult]]:
        """Settle everything held as failed (a round failed where no one session can be blamed, or shutdown)."""
        entries = [*self._queue, *self._held.values()]
        self._queue.clear()
        self._held.clear()
        self._waves.clear()
        settled, self._settled = self._settled, []
        return settled + [(e.run, self._finish(e.run, why)) for e in entries]

    # -- the round ---------------------------------------------------------------------------
    def advance(self) -> Progress:
        """Reserve what fits in submission order, start what can start, run one engine step."""
        progress = Progress()
        self._reserve_in_order(progress)
        self._start_wave()
        if self.llm.busy:
            for run in self.llm.step(on_output=lambda session_id, n, output: self._note_piece(progress, session_id,
                                                                                           n, output)):
                entry = self._held.pop(run.session_id)
                self._settled.append((entry.run, self._finish(entry.run)))
        progress.finished, self._settled = self._settled, []
        return progress

    def _reserve_in_order(self, progress: Progress) -> None:
        starting = []
        while self._queue and self.llm.reserve(self._queue[0].run):
            entry = self._queue.popleft()
            self._held[entry.run.session_id] = entry
            if entry.lengths is None:
                progress.reserved.append(entry.run)
            else:
                starting.append((entry.run.session_id, entry.lengths))
        if self._queue and not self._held:
            raise RuntimeError("admission refused a session that fits an empty engine")  # plan_run checked it: a bug
        if starting:
            self._start(starting)

    def _start_wave(self) -> None:
        """Exactly one wave of go'd sessions per step (the ordering rule)."""
        if self._waves:
            self._start(self._waves.popleft())

    def _start(self, wave: list[tuple[str, list[int]]]) -> None:
        for session_id, lengths in wave:
            entry = self._held.get(session_id)
            if entry is None or entry.run.started:
                continue  # aborted meanwhile, or a repeated go
            try:
                self.llm.start(entry.run, lengths)
            except Exception as error:  # this session's alone (lengths that do not match, an engine refusal)
                log.warning("starting session %s failed: %s", session_id, error)
                del self._held[session_id]
                self._settled.append((entry.run, self._finish(entry.run, f"the engine refused the session: {error}")))

    def _note_piece(self, progress: Progress, session_id: str, participant: int, output) -> None:
        entry = self._held.get(session_id)
        if entry is None or participant not in entry.run.plan.generators:
            return
        completion = output.outputs[0]  # cumulative (plan_run asks for it): what is new is past what was sent
        text_sent, tokens_sent = entry.sent.get(participant, (0, 0))
        progress.pieces.setdefault(session_id, {})[participant] = Piece(
            completion.text[text_sent:], list(completion.token_ids[tokens_sent:]),
            None if completion.logprobs is None else completion.logprobs[tokens_sent:])
        entry.sent[participant] = (len(completion.text), len(completion.token_ids))

    def _finish(self, run: SessionRun, why: str | None = None) -> SessionResult:
        """`llm.finish`, which never leaves the run held: if freeing fails the failure is logged, the run failed."""
        try:
            return self.llm.finish(run, why)
        except Exception as error:
            log.exception("freeing session %s failed", run.session_id)
            n = run.num_participants
            tokens = [len(run.prompts.get(p, ())) for p in range(n)]
            return SessionResult({}, SessionCost(tokens, run.plan.sync_layers, [0] * n, [0] * n, len(run.prefix)),
                                 error=why or f"freeing the session failed: {error}")
