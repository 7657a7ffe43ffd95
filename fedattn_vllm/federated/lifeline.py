"""A child process that ends with its parent: no engine or coordinator outlives the process that started it.

Launchers on this machine (LocalCluster) pass `--parent-pid`; the child then
watches its parent and sends itself SIGTERM (what LocalCluster.close sends) once the
parent is gone, however the parent died (SIGKILL included). Processes started by hand on
other machines leave it off.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.5


def exit_with_parent(parent: int, poll_s: float = POLL_S) -> None:
    """Terminate this process once `parent` is no longer its parent (a daemon thread polls; at once if already)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fedattn-lifeline", daemon=True).start()
