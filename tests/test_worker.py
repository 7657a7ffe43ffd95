"""The server's engine thread survives what a session does to it (unit test of its loop: a scripted engine).

The real engine is covered end to end in test_server*.py; here the engine's step is made to
raise on demand, which no real input should be able to do any more.
"""

from __future__ import annotations

import pytest

from fedattn_vllm.session import FedAttnSession, SessionCost, SessionResult
from server.worker import MAX_CONSECUTIVE_FAILURES, EngineDead, EngineWorker, QueueFull


class ScriptedRun:
    def __init__(self, session_id: str):
        self.session_id = session_id
        self.started = False


class ScriptedLLM:
    """The parts of FederatedLLM the worker drives; `step` raises while `failing` is set."""

    def __init__(self):
        self.failing = False
        self.active: dict[str, ScriptedRun] = {}
        self.finished: list[tuple[str, str | None]] = []
        self._ids = iter(range(10**6))

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def prepare(self, session):
        return ScriptedRun(f"run-{next(self._ids)}"), [len(s) for s in session.segments]

    def reserve(self, run) -> bool:
        return True

    def start(self, run, lengths) -> None:
        run.started = True
        self.active[run.session_id] = run

    def step(self, on_output=None):
        if self.failing:
            raise RuntimeError("the engine broke")
        done, self.active = list(self.active.values()), {}
        return done

    def finish(self, run, error=None):
        self.active.pop(run.session_id, None)
        self.finished.append((run.session_id, error))
        return SessionResult({}, SessionCost([1], (), [0], [0]), error=error)


def session() -> FedAttnSession:
    return FedAttnSession([[1, 2, 3]])


@pytest.fixture
def worker():
    llm = ScriptedLLM()
    worker = EngineWorker(llm, max_sessions=2)
    yield worker, llm
    worker.close()


def test_a_failing_round_fails_its_sessions_releases_their_slots_and_the_thread_goes_on(worker):
    worker, llm = worker
    llm.failing = True
    results = [worker.submit(session())[1].result(timeout=10) for _ in range(2)]
    assert all("the engine broke" in r.error for r in results)
    assert len(llm.finished) == 2 and all(error is not None for _, error in llm.finished)  # state freed
    llm.failing = False
    ok = [worker.submit(session()) for _ in range(2)]  # both slots are free again
    assert [f.result(timeout=10).error for _, f, _ in ok] == [None, None]
    assert worker.health() is None


def test_an_engine_that_keeps_failing_is_declared_dead_and_refuses_at_once(worker):
    worker, llm = worker
    llm.failing = True
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        assert worker.submit(session())[1].result(timeout=10).error
    assert "failed 3 times in a row" in worker.health()
    with pytest.raises(EngineDead):
        worker.submit(session())


def test_slots_are_bounded_and_held_by_acquire(worker):
    worker, llm = worker
    worker.acquire()
    worker.acquire()
    with pytest.raises(QueueFull):
        worker.submit(session())
    worker.release()
    _, future, _ = worker.submit(session(), held=True)  # the other held slot goes to this session
    assert future.result(timeout=10).error is None
    assert worker.submit(session())[1].result(timeout=10).error is None  # the slot came back when it ended
