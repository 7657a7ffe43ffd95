"""C kernels beside their torch references: compiled once per source, cached, loaded with ctypes.

A kernel `kernels/<name>.c` builds with the system C compiler (`$CC`, else `cc`) into
`<cache>/kernels/<name>-<hash of CPU, compiler, flags>-<hash of source>.so`, written under a
temporary name and renamed into place, so concurrent processes never load a half-written
library. Where no compiler works (or the file cannot be loaded), with
`FEDATTN_NATIVE_KERNELS=0` in the environment, or inside `reference_only()`, the kernel is
unavailable (`library` returns None) and callers use the torch reference, which computes the
same bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedattn_vllm.paths import cache_dir

logger = logging.getLogger(__name__)

# IEEE float32 arithmetic exactly as written (no fused multiply-add, no fast-math), like torch's CPU kernels, so
# the bits do not depend on the vector width -march=native picks; the build is cached per CPU (`_cpu`). No code
# reads the floating-point exception flags, so the compiler may compute both arms of a branch-free select and
# vectorise it (-fno-trapping-math: results unchanged).
FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC",
         "-shared")


def _cpu() -> str:
    """The machine and its CPU's feature flags (a cache shared between machines never serves another CPU's build)."""
    try:
        features = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith(("flags", "Features"))), "")
    except OSError:
        features = ""
    return f"{platform.machine()} {features}"


_switched_on = os.environ.get("FEDATTN_NATIVE_KERNELS") != "0"


def library(name: str) -> ctypes.CDLL | None:
    """kernels/<name>.c, compiled (cached) and loaded; None where it cannot be built here or is switched off."""
    return _built(name) if _switched_on else None


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Every kernel switched off inside (benchmarks time the torch references so, side by side)."""
    global _switched_on
    before, _switched_on = _switched_on, False
    try:
        yield
    finally:
        _switched_on = before


@functools.cache
def _built(name: str) -> ctypes.CDLL | None:
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC") or "cc"
    cpu = hashlib.sha256(f"{_cpu()} {compiler} {' '.join(FLAGS)}".encode()).hexdigest()[:8]
    target = cache_dir() / "kernels" / f"{name}-{cpu}-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}.so"
    try:
        if not target.exists():
            _build(source, compiler, target)
            for stale in target.parent.glob(f"{name}-{cpu}-*.so"):  # this CPU's builds of earlier sources
                if stale != target:
                    stale.unlink(missing_ok=True)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:  # no compiler, a failed build, an unloadable file
        detail = error.stderr if isinstance(error, subprocess.CalledProcessError) else error
        logger.warning("the %s kernel is unavailable here, its torch reference runs instead: %s", name, detail)
        return None


def _build(source: Path, compiler: str, target: Path) -> None:
    """Compile `source` into `target`, written under a temporary name and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, "-o", partial, str(source), "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
