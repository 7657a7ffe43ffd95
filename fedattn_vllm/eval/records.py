"""Per-case results as gzip-compressed JSON lines (`<run>.jsonl.gz`): small in the repository, byte-stable."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

SUFFIX = ".jsonl.gz"


def rows_path(directory: Path, run: str) -> Path:
    return directory / f"{run}{SUFFIX}"


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line; no timestamp in the gzip header, so equal rows give equal bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for row in rows:
            out.write((json.dumps(row) + "\n").encode())


def read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as lines:
        return [json.loads(line) for line in lines if line.strip()]
