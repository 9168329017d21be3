"""Which input shards a collection already holds in full: the backfill's resume record.

Sits beside the job's flow, at its two ends: before reading, the job skips the shards recorded
here; while results stream back, it records a shard once every one of its rows was written,
rejected or found unchanged, and once a Milvus flush covers those writes. (With several writers
on one Milvus Lite server a crash loses every write since the last flush, so a shard counts as
done only after a flush that covers it.) A shard is one input file, fingerprinted by size and
modification time: a file that changed since it was recorded is read again.

The record is an append-only JSONL file with one line per finished shard, fsync'ed after each
append; a line torn by a crash is ignored. Each line carries the run key: a hash of everything
that decides what a shard's rows become (the collection's identity and Milvus collection id, the
id and text fields, the partitioning, the stored text length), so a shard recorded for another
collection, another model or a dropped and re-created collection never counts. The collection
itself stays the source of truth: a rerun of an unrecorded shard compares content hashes and
re-embeds only what is missing or different, so losing this file costs time, never correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from reembed.shards import Shard

logger = logging.getLogger(__name__)

STATE_FILE = "shards.jsonl"
SHARD_FIELDS = tuple(f.name for f in fields(Shard))


def run_key(parts: dict[str, Any]) -> str:
    """A stable hash of what decides a shard's rows (see the module docstring)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ShardLog:
    """The finished shards of one collection under one run key, read once and appended to."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self._done: dict[str, list[Shard]] = {}  # file path -> its finished shards
        if self.path.exists():
            for line_no, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    if entry.get("run_key") == key:
                        self._add(Shard(**{f: entry[f] for f in SHARD_FIELDS}))
                except (ValueError, TypeError, KeyError):
                    logger.warning(
                        "%s:%d: ignoring a torn or unreadable line (a crash mid-append?)", self.path, line_no
                    )

    def _add(self, shard: Shard) -> None:
        shards = self._done.setdefault(shard.path, [])
        if shard not in shards:
            shards.append(shard)

    def recorded_paths(self) -> set[str]:
        """Every input file with a shard recorded under this run key (whatever its size and mtime)."""
        return set(self._done)

    def done_shards(self, path: str, size: int, mtime_ns: int) -> list[Shard]:
        """The recorded shards of `path`, if the file is still as it was (same size and mtime)."""
        return [s for s in self._done.get(path, []) if s.size == size and s.mtime_ns == mtime_ns]

    def record(self, shards: list[tuple[Shard, int]], run_id: str) -> None:
        """Append finished shards (shard, rows) and fsync: call only after a covering flush."""
        if not shards:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for shard, rows in shards:
            self._add(shard)
            entry = {**asdict(shard), "rows": rows, "run_key": self.key, "run": run_id}
            lines.append(json.dumps(entry, sort_keys=True))
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        with open(self.path, "a") as fh:
            # After a torn last line, start on a new line so that this append stays readable.
            fh.write(("\n" if torn else "") + "\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
