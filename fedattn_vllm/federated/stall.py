"""Where a stalled engine waits: every thread's stack, logged once when one engine step runs too long.

A federated engine's step blocks while a sync layer waits on another party's K/V (or, under tensor parallelism,
while its ranks wait on the rank gateway). A step that runs `after_s` is late for every session in it; the
stacks say on what (a fetch, a publish, a collective, a lock), which no error message can once the orchestrator
has given the engine up.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StepWatch:
    """A daemon thread that logs every thread's stack once per step that has run `after_s`."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self._started: float | None = None  # the running step's start (time.monotonic()), None between steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedattn-step-watch", daemon=True)
        self._thread.start()

    @contextmanager
    def step(self) -> Iterator[None]:
        self._started = time.monotonic()
        try:
            yield
        finally:
            self._started = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        reported = None
        while not self._stop.wait(min(self.after_s / 4, 5.0)):
            started = self._started
            if started is not None and started != reported and time.monotonic() - started >= self.after_s:
                reported = started
                log.warning("an engine step has run %.0f s; where every thread is:\n%s",
                            time.monotonic() - started, thread_stacks())


def thread_stacks() -> str:
    """Every thread's name and stack, innermost call last."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
                     for ident, frame in sys._current_frames().items())
