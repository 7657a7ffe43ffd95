"""The session driver's ordering and failure rules (pure logic, on a stand-in engine; the real engine drives it in
test_engine, test_server and test_federated)."""

from types import SimpleNamespace

import pytest

from fedattn_vllm.admission import SessionDemand
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.driver import SessionDriver
from fedattn_vllm.session import Piece, SessionCost, SessionResult, SessionRun


class StandInEngine:
    """Room for `slots` sessions at once; a started session finishes after `steps` steps; generators say "ab"."""

    def __init__(self, slots: int = 1, steps: int = 2):
        self.slots, self.steps = slots, steps
        self.reserved: list[str] = []
        self.active: dict[str, int] = {}  # session -> steps run
        self.log: list[tuple[str, str]] = []
        self.refuse: set[str] = set()  # sessions whose start raises
        self.broken_finish: set[str] = set()

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def running(self) -> int:
        return len(self.active)

    def reserve(self, run) -> bool:
        if len(self.reserved) >= self.slots:
            return False
        self.reserved.append(run.session_id)
        self.log.append(("reserve", run.session_id))
        return True

    def start(self, run, lengths) -> None:
        if run.session_id in self.refuse:
            raise ValueError(f"lengths {lengths} do not match")
        run.started = True
        self.active[run.session_id] = 0
        self.log.append(("start", run.session_id))

    def step(self, on_output=None):
        done = []
        for session_id in list(self.active):
            self.active[session_id] += 1
            n = self.active[session_id]
            on_output(session_id, 1, SimpleNamespace(outputs=[SimpleNamespace(text="ab"[:n], token_ids=[7, 8][:n],
                                                                               logprobs=None)]))
            on_output(session_id, 0, SimpleNamespace(outputs=[SimpleNamespace(text="not a generator", token_ids=[1],
                                                                               logprobs=None)]))
            if self.active[session_id] == self.steps:
                del self.active[session_id]
                done.append(RUNS[session_id])
        return done

    def finish(self, run, error=None) -> SessionResult:
        if run.session_id in self.broken_finish:
            raise RuntimeError("freeing failed")
        self.active.pop(run.session_id, None)
        if run.session_id in self.reserved:
            self.reserved.remove(run.session_id)
        self.log.append(("finish", run.session_id))
        return SessionResult({}, SessionCost([1, 1], (), [0, 0], [0, 0]), error=error)


RUNS: dict[str, SessionRun] = {}


def run_of(session_id: str) -> SessionRun:
    plan = FedAttnConfig().resolve(4, 2)  # participant 1 generates
    RUNS[session_id] = SessionRun(session_id, {0: [1], 1: [2]}, [], 2, None, plan, SessionDemand((1, 1), (1, 4)))
    return RUNS[session_id]


def drain(driver: SessionDriver) -> list[str]:
    finished = []
    while driver.holding:
        finished += [run.session_id for run, _ in driver.advance().finished]
    return finished


def test_sessions_start_in_submission_order_as_room_frees_and_report_only_new_generator_output():
    engine = StandInEngine(slots=1)
    driver = SessionDriver(engine)
    for session_id in "abc":
        driver.submit(run_of(session_id), [1, 1])
    first = driver.advance()
    assert first.pieces == {"a": {1: Piece("a", [7])}} and first.reserved == [] and driver.queued == 2
    second = driver.advance()
    assert second.pieces == {"a": {1: Piece("b", [8])}} and [run.session_id for run, _ in second.finished] == ["a"]
    assert drain(driver) == ["b", "c"]
    assert [entry for entry in engine.log if entry[0] == "start"] == [("start", s) for s in "abc"]


def test_without_lengths_a_reserved_session_waits_for_its_go_and_waves_start_one_per_step():
    engine = StandInEngine(slots=3)
    driver = SessionDriver(engine)
    for session_id in "xyz":
        driver.submit(run_of(session_id))
    progress = driver.advance()
    assert [run.session_id for run in progress.reserved] == ["x", "y", "z"] and not engine.active
    assert not driver.stepping  # nothing to step until a go
    driver.go([("x", [1, 1])])
    driver.go([("y", [1, 1]), ("z", [1, 1])])
    driver.advance()
    assert list(engine.active) == ["x"]
    driver.advance()
    assert set(engine.active) == {"y", "z"}
    assert sorted(drain(driver)) == ["y", "z"]


def test_a_start_the_engine_refuses_fails_that_session_alone():
    engine = StandInEngine(slots=2)
    engine.refuse.add("bad")
    driver = SessionDriver(engine)
    driver.submit(run_of("bad"), [1, 1])
    driver.submit(run_of("good"), [1, 1])
    progress = driver.advance()
    (run, result), = [(r, res) for r, res in progress.finished if r.session_id == "bad"]
    assert "the engine refused the session" in result.error and "do not match" in result.error
    assert drain(driver) == ["good"]


def test_abort_takes_a_session_from_the_queue_or_the_engine_and_unknown_ones_are_none():
    engine = StandInEngine(slots=1)
    driver = SessionDriver(engine)
    driver.submit(run_of("held"), [1, 1])
    driver.submit(run_of("queued"), [1, 1])
    driver.advance()
    assert driver.abort("queued", "cancelled")[1].error == "cancelled"
    assert driver.abort("held", "cancelled")[1].error == "cancelled"
    assert driver.abort("held", "cancelled") is None and not driver.holding and not engine.active


def test_fail_all_settles_everything_even_when_freeing_one_raises_and_a_duplicate_is_refused():
    engine = StandInEngine(slots=1)
    engine.broken_finish.add("a")
    driver = SessionDriver(engine)
    driver.submit(run_of("a"), [1, 1])
    driver.submit(run_of("b"))
    with pytest.raises(ValueError, match="already submitted"):
        driver.submit(run_of("b"))
    driver.advance()
    failed = dict((run.session_id, result.error) for run, result in driver.fail_all("engine down"))
    assert failed == {"a": "engine down", "b": "engine down"} and not driver.holding


def test_a_result_settled_in_a_round_that_then_raises_is_reported_later_not_lost():
    engine = StandInEngine(slots=2)
    engine.refuse.add("bad")
    driver = SessionDriver(engine)
    driver.submit(run_of("bad"), [1, 1])
    driver.submit(run_of("good"), [1, 1])

    def broken_step(on_output=None):
        raise RuntimeError("the engine broke")

    engine.step = broken_step
    with pytest.raises(RuntimeError, match="broke"):
        driver.advance()  # "bad" was refused and settled before the step raised
    failed = dict((run.session_id, result.error) for run, result in driver.fail_all("round failed"))
    assert "refused the session" in failed["bad"] and failed["good"] == "round failed"
