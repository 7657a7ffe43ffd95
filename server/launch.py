"""Starting HTTP servers as processes on loopback (tests, benchmarks): wait until healthy.

(A free port: fedattn_vllm.federated.local.free_port.)"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `url`/health until it answers 200; raise (with the log's tail) if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(map(str, process.args[:3]))} did not become healthy; {log}:\n{tail}")
        time.sleep(0.5)
