"""The GPU readiness script (scripts/gpu_check.py) runs its checks on the CPU, small, so it cannot rot unseen."""

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_the_gpu_check_passes_on_the_cpu_and_reports_every_check():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("  ok") for line in lines) == 4 + 5 + 4 and lines[-1] == "all checks passed"


def test_without_a_gpu_it_refuses_to_pretend():
    if torch.cuda.is_available():  # on a GPU box the default is the full check, not this refusal
        return
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
