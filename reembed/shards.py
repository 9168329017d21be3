"""Input shards: the unit the backfill reads, tracks and resumes by.

First step of the job's flow. A shard is a byte range of a JSONL file or a range of row groups
of a Parquet file. Byte ranges follow the usual rule for splitting line files: a range owns the
lines whose first byte lies inside it, so ranges cut anywhere still give every line exactly once.
`plan_shards` cuts each file into shards of about `shard_bytes`, leaving out the ranges that the
resume record (`reembed.state.ShardLog`) holds for the same file unchanged; `read_shard` turns one
shard into tables of document rows (`reembed.documents.DOC_COLUMNS`) and ends with a one-row
end-of-shard marker that carries the shard's row count, so whoever counts rows downstream knows
when the whole shard has been seen, whatever order the blocks come back in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reembed.documents import (
    DocumentSpec,
    end_of_shard,
    mark_duplicates,
    normalize_json_lines,
    normalize_records,
    shard_error,
    with_shard,
)
from reembed.errors import InputDataError

if TYPE_CHECKING:
    from reembed.inputs import InputPlan
    from reembed.state import ShardLog

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
ROWS_PER_TABLE = 4096
# Shards of a small input are cut small enough that every embedding actor gets several; those of
# a large one stay within these bounds (task overhead below, resume granularity above).
MIN_SHARD_BYTES = 64 << 10
MAX_SHARD_BYTES = 64 << 20
SHARDS_PER_ACTOR = 8
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Shard:
    """[start, end) of one file: bytes of a JSONL file, row groups of a Parquet file.

    `size` and `mtime_ns` fingerprint the file as planned: a file that changed since a shard of
    it was recorded as done is read again.
    """

    path: str
    kind: str  # "jsonl" or "parquet"
    start: int
    end: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return f"{self.path}#{self.start}-{self.end}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Shard:
        return cls(**json.loads(text))


def auto_shard_bytes(total_bytes: int, actors: int) -> int:
    """About SHARDS_PER_ACTOR shards per embedding actor, within [MIN_SHARD_BYTES, MAX_SHARD_BYTES]."""
    wanted = total_bytes // max(1, actors * SHARDS_PER_ACTOR)
    return int(min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, wanted)))


def _gaps(length: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [0, length) not covered by the (start, end) ranges in `done`."""
    gaps, pos = [], 0
    for start, end in sorted(done):
        if start > pos:
            gaps.append((pos, start))
        pos = max(pos, end)
    if pos < length:
        gaps.append((pos, length))
    return gaps


def _cut(start: int, end: int, step: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil((end - start) / step))
    width = math.ceil((end - start) / n)
    return [(s, min(end, s + width)) for s in range(start, end, width)]


def plan_shards(plan: InputPlan, shard_bytes: int, log: ShardLog | None = None) -> tuple[list[Shard], list[Shard]]:
    """(shards to read, shards already done) for every input file.

    JSONL files are cut into byte ranges of about `shard_bytes`; Parquet files into ranges of row
    groups of about that many bytes. Ranges that `log` records as done for the same unchanged
    file are kept as they were recorded and skipped; only the rest is cut anew.
    """
    todo: list[Shard] = []
    done: list[Shard] = []
    fs = plan.filesystem
    infos = {i.path: i for i in fs.get_file_info(plan.files)}
    jsonl = set(plan.jsonl_files)
    for path in plan.files:
        info = infos[path]
        size, mtime_ns = int(info.size or 0), int(info.mtime_ns or 0)
        kind = "jsonl" if path in jsonl else "parquet"
        recorded = log.done_shards(path, size, mtime_ns) if log else []
        done.extend(recorded)
        if kind == "jsonl":
            length, unit_bytes = size, 1
        else:
            try:
                with fs.open_input_file(path) as fh:
                    row_groups = pq.ParquetFile(fh).metadata.num_row_groups
            except Exception as exc:
                raise InputDataError(f"shard {path}: cannot read Parquet metadata: {exc}") from exc
            length, unit_bytes = row_groups, max(1, size // max(1, row_groups))
        step = max(1, shard_bytes // unit_bytes)
        for gap_start, gap_end in _gaps(length, [(s.start, s.end) for s in recorded]):
            for start, end in _cut(gap_start, gap_end, step):
                todo.append(Shard(path, kind, start, end, size, mtime_ns))
        if length == 0 and not recorded:  # an empty file is a shard of no rows
            todo.append(Shard(path, kind, 0, 0, size, mtime_ns))
    return todo, done


def iter_lines_in_range(fh: Any, start: int, end: int, chunk: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """The lines (without their newline) whose first byte lies in [start, end) of a seekable file."""
    if start > 0:
        fh.seek(start - 1)
        skip_partial = fh.read(1) != b"\n"  # mid-line: that line belongs to the previous range
    else:
        fh.seek(0)
        skip_partial = False
    pos, buf = start, b""  # pos: the file offset of buf[0]
    while True:
        data = fh.read(chunk)
        buf += data
        i = 0
        while (nl := buf.find(b"\n", i)) >= 0:
            line_start, line = pos + i, buf[i:nl]
            i = nl + 1
            if skip_partial:
                skip_partial = False
                continue
            if line_start >= end:
                return
            yield line
        pos, buf = pos + i, buf[i:]
        if not data:
            if buf and not skip_partial and pos < end:
                yield buf  # a last line without a newline
            return


def read_shard(
    fs: pafs.FileSystem, shard: Shard, spec: DocumentSpec, duplicates: dict[str, int] | None = None
) -> Iterator[pa.Table]:
    """One shard -> tables of DOC_COLUMNS (good documents and rejects), then its end-of-shard marker.

    A shard that cannot be read to its end ends with an error marker naming it and the cause
    instead: the rows read before stay (they are written like any others), the shard is never
    recorded as done, and the other shards go on. Bad records are rejects, not errors.
    """
    dup = duplicates or {}
    rows = 0
    try:
        tables = _read_jsonl(fs, shard, spec) if shard.kind == "jsonl" else _read_parquet(fs, shard, spec)
        for table in tables:
            rows += table.num_rows
            yield with_shard(mark_duplicates(table, dup), shard.key)
    except Exception as exc:
        logger.error("shard %s: cannot read: %s", shard.key, exc)
        yield shard_error(shard.key, shard.path, f"shard {shard.key}: cannot read: {exc}")
        return
    yield end_of_shard(shard.key, shard.path, rows)


def _read_jsonl(fs: pafs.FileSystem, shard: Shard, spec: DocumentSpec) -> Iterator[pa.Table]:
    if shard.end <= shard.start:
        return
    with fs.open_input_file(shard.path) as fh:
        lines: list[str | bytes] = []
        at_file_start = shard.start == 0  # the first line yielded then is the one at offset 0
        for raw in iter_lines_in_range(fh, shard.start, shard.end):
            if at_file_start:
                at_file_start = False
                # Editors on Windows start UTF-8 files with a byte-order mark: it says how the file is
                # encoded, it is not part of the first record. Anywhere else it is data (a reject).
                if raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]
            if not raw.strip():
                continue  # blank lines are no records
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(raw)  # kept as bytes: a reject, with its text decoded as far as it goes
            if len(lines) >= ROWS_PER_TABLE:
                yield normalize_json_lines(lines, [shard.path] * len(lines), spec)
                lines = []
        if lines:
            yield normalize_json_lines(lines, [shard.path] * len(lines), spec)


def _read_parquet(fs: pafs.FileSystem, shard: Shard, spec: DocumentSpec) -> Iterator[pa.Table]:
    if shard.end <= shard.start:
        return
    with fs.open_input_file(shard.path) as fh:
        parquet = pq.ParquetFile(fh)
        names = parquet.schema_arrow.names
        columns = [c for c in dict.fromkeys([spec.id_field, *spec.text_fields, spec.partition_by]) if c and c in names]
        for batch in parquet.iter_batches(
            batch_size=ROWS_PER_TABLE, row_groups=list(range(shard.start, shard.end)), columns=columns
        ):
            table = pa.Table.from_batches([batch])
            yield normalize_records(_records(table), [shard.path] * table.num_rows, spec)


def _records(table: pa.Table) -> list[dict[str, Any]]:
    """The rows of a Parquet batch as dicts. Parquet does not check that a string column holds
    UTF-8: a batch with a value that is not is read again with its strings as bytes, which
    `normalize_records` decodes value by value, so that only the rows holding one are rejects."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        as_bytes = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}
        schema = pa.schema([f.with_type(as_bytes.get(f.type, f.type)) for f in table.schema])
        return table.cast(schema).to_pylist()
