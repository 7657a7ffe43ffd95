"""A federated engine's step watch: a step that runs too long has every thread's stack logged, once."""

from __future__ import annotations

import logging
import time

from fedattn_vllm.federated.stall import StepWatch


def waiting_on_a_peer(seconds: float) -> None:
    time.sleep(seconds)


def test_a_long_step_logs_where_every_thread_is_once(caplog):
    watch = StepWatch(after_s=0.3)
    try:
        with caplog.at_level(logging.WARNING, logger="fedattn_vllm.federated.stall"):
            with watch.step():
                waiting_on_a_peer(2.0)  # several of the watch's looks: still one report
            time.sleep(0.5)  # after the step: nothing more
    finally:
        watch.close()
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 1, reports
    assert "an engine step has run" in reports[0]
    assert "thread MainThread:" in reports[0] and "waiting_on_a_peer" in reports[0]
    assert not watch._thread.is_alive()
