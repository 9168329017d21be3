"""Turn raw input records into validated documents, or into rejects with a reason.

First step of the job's flow, run inside Ray Data tasks on each block. A record becomes a row of
`DOC_COLUMNS`: its id, the text to embed (the present text fields joined with one space, as
BEIR/MTEB do), the partition it goes to, a hash of the text, where it came from, and an empty
`reject` column, or a reason there and the raw record kept so nothing is lost.

A bad record costs only itself: whatever is wrong with it (not JSON, not UTF-8, a value Milvus
cannot store) makes it one reject, never an error that fails its shard. Every string a row
carries, a reject's included, is valid Unicode, since Arrow and Milvus both need UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from reembed.expr import unstorable
from reembed.store import DEFAULT_PARTITION, ID_MAX_BYTES, is_valid_milvus_name

C_ID = "id"
C_TEXT = "text"
C_PARTITION = "partition"
C_HASH = "content_sha256"
C_SOURCE = "source"
C_REJECT = "reject"
C_RAW = "raw"
# What happens to a row: read as `new` (or `rejected`), then the change detector may make a good
# row `changed`, `moved` (stored in another partition) or `unchanged`. One `eof` row ends each
# input shard and carries its row count in C_SHARD_ROWS; an `error` row says a shard could not be
# read to its end (its reason in C_REJECT), so the shard is never recorded as done.
C_STATUS = "status"
C_SHARD = "shard"
C_SHARD_ROWS = "shard_rows"
S_NEW = "new"
S_CHANGED = "changed"
S_MOVED = "moved"
S_UNCHANGED = "unchanged"
S_REJECTED = "rejected"
S_EOF = "eof"
S_ERROR = "error"
DOC_COLUMNS = (C_ID, C_TEXT, C_PARTITION, C_HASH, C_SOURCE, C_REJECT, C_RAW, C_STATUS, C_SHARD, C_SHARD_ROWS)
DOC_SCHEMA = pa.schema([(c, pa.int64() if c == C_SHARD_ROWS else pa.string()) for c in DOC_COLUMNS])
REASON_DUPLICATE = "duplicate id: it appears {n} times in the input; all copies are kept here"


@dataclass(frozen=True)
class DocumentSpec:
    """How to read a document out of a record, and where it goes."""

    id_field: str = "_id"
    text_fields: tuple[str, ...] = ("title", "text")
    partition_by: str | None = None
    partitions: int = 1

    def partition_for_id(self, doc_id: str) -> str:
        if self.partitions <= 1:
            return DEFAULT_PARTITION
        bucket = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % self.partitions
        return hash_partition_name(bucket)

    def partitioning(self) -> dict[str, Any]:
        if self.partition_by:
            return {"scheme": "field", "field": self.partition_by}
        return {"scheme": "hash", "partitions": self.partitions}


def hash_partition_name(bucket: int) -> str:
    return f"part_{bucket:04d}"


def partition_name_for_value(value: str) -> str:
    """A valid Milvus partition name for a field value, the same for the same value on any run.

    Valid names are used as they are; others are cleaned and get a short hash of the original,
    so "en-US" and "en_US" never share a partition.
    """
    if is_valid_milvus_name(value) and value != DEFAULT_PARTITION:
        return value
    clean = re.sub(r"[^A-Za-z0-9_]", "_", value)[:200]
    digest = hashlib.blake2b(value.encode(), digest_size=4).hexdigest()
    return f"p_{clean}_{digest}"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def storable_text(text: str) -> str:
    """`text` with any lone surrogate written as a backslash escape: fit for a reason or a raw column."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _decoded(value: Any, field: str) -> tuple[Any, str]:
    """A value with bytes (a Parquet binary column) decoded strictly as UTF-8, or a reject reason."""
    if not isinstance(value, (bytes, bytearray)):
        return value, ""
    try:
        return bytes(value).decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"bad encoding: field {field!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def _id_of(record: dict[str, Any], field: str) -> tuple[str | None, str]:
    if field not in record or record[field] is None:
        return None, f"missing id: field {field!r} is absent or null"
    value, reason = _decoded(record[field], field)
    if reason:
        return None, reason
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"bad id: field {field!r} must be a string or an integer, got {type(value).__name__}"
    # Any string is an id, kept exactly as given (whitespace included): only "" names nothing.
    doc_id = str(value)
    if not doc_id:
        return None, f"bad id: field {field!r} is empty"
    why = unstorable(doc_id)
    if why:
        return None, f"bad id: field {field!r} cannot be stored: {why}"
    size = len(doc_id.encode("utf-8"))
    if size > ID_MAX_BYTES:
        return None, f"bad id: field {field!r} must be at most {ID_MAX_BYTES} bytes in UTF-8, got {size}"
    return doc_id, ""


def _text_of(record: dict[str, Any], fields: Sequence[str]) -> tuple[str | None, str]:
    parts = []
    for field in fields:
        value, reason = _decoded(record.get(field), field)
        if reason:
            return None, reason
        if value is None:
            continue
        if not isinstance(value, str):
            return None, f"bad text: field {field!r} must be a string, got {type(value).__name__}"
        why = unstorable(value)
        if why:
            return None, f"bad text: field {field!r} cannot be stored or embedded: {why}"
        # Only the ends are stripped: inner control characters (a PDF's form feeds, tabs) are text.
        if value.strip():
            parts.append(value.strip())
    if not parts:
        return None, f"missing text: fields {', '.join(fields)} are absent or empty"
    return " ".join(parts), ""


def _partition_of(record: dict[str, Any], field: str) -> tuple[str | None, str]:
    value, reason = _decoded(record.get(field), field)
    if reason:
        return None, reason
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value):
        return None, f"bad partition: field {field!r} must be a non-empty string or integer"
    why = unstorable(str(value))
    if why:
        return None, f"bad partition: field {field!r} cannot be stored: {why}"
    return partition_name_for_value(str(value)), ""


def empty_row(source: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(DOC_COLUMNS, "")
    row[C_SOURCE] = source
    row[C_STATUS] = S_NEW
    row[C_SHARD_ROWS] = 0
    return row


def reject_row(source: str, reason: str, raw: str) -> dict[str, Any]:
    row = empty_row(source)
    row.update({C_REJECT: reason, C_RAW: raw, C_STATUS: S_REJECTED})
    return row


def normalize_record(record: Any, source: str, raw: str, spec: DocumentSpec) -> dict[str, Any]:
    """One input record -> one row of DOC_COLUMNS (status `new`, or `rejected` with a reason)."""
    if not isinstance(record, dict):
        return reject_row(source, f"bad record: expected a JSON object, got {type(record).__name__}", raw)
    try:
        return _normalize_object(record, source, raw, spec)
    except Exception as exc:  # a record this code did not foresee is still one reject, not a failed shard
        reason = storable_text(f"bad record: cannot be read: {type(exc).__name__}: {exc}")
        return reject_row(source, reason, raw)


def _normalize_object(record: dict[str, Any], source: str, raw: str, spec: DocumentSpec) -> dict[str, Any]:
    row = empty_row(source)
    doc_id, reason = _id_of(record, spec.id_field)
    if doc_id is not None:
        row[C_ID] = doc_id
        text, reason = _text_of(record, spec.text_fields)
        if text is not None:
            if spec.partition_by:
                partition, reason = _partition_of(record, spec.partition_by)
            else:
                partition = spec.partition_for_id(doc_id)
            if not reason:
                row[C_PARTITION] = partition
                row[C_TEXT] = text
                row[C_HASH] = content_hash(text)
                return row
    rejected = reject_row(source, reason, raw)
    rejected[C_ID] = row[C_ID]
    return rejected


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pydict({c: [r[c] for r in rows] for c in DOC_COLUMNS}, schema=DOC_SCHEMA)


def normalize_json_lines(lines: Iterable[str | bytes], sources: Iterable[str], spec: DocumentSpec) -> pa.Table:
    """JSONL lines (one document each) -> a table of DOC_COLUMNS. Unparsable lines are rejects;
    a line given as bytes is one that is not valid UTF-8. A line given as str is valid Unicode
    (decoded from UTF-8), so it is kept as the raw record as it is."""
    rows = []
    for line, source in zip(lines, sources, strict=True):
        if isinstance(line, bytes):
            rows.append(
                reject_row(source, "bad encoding: the line is not valid UTF-8", line.decode("utf-8", "replace"))
            )
            continue
        try:
            # strict=False: raw control characters inside strings (tabs, a PDF's form feeds) are
            # text as much as their escaped forms, so they are read, not rejected.
            record = json.loads(line, strict=False)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than Python's stack
            rows.append(reject_row(source, f"bad JSON: {type(exc).__name__}: {exc}", line))
            continue
        rows.append(normalize_record(record, source, line, spec))
    return _to_table(rows)


def with_shard(table: pa.Table, shard: str) -> pa.Table:
    """Stamp every row with the shard it was read from."""
    return table.set_column(
        table.schema.get_field_index(C_SHARD), C_SHARD, pa.array([shard] * table.num_rows, pa.string())
    )


def shard_error(shard: str, source: str, reason: str) -> pa.Table:
    """The one-row marker of a shard that could not be read to its end."""
    row = empty_row(source)
    row.update({C_STATUS: S_ERROR, C_SHARD: shard, C_REJECT: reason})
    return _to_table([row])


def end_of_shard(shard: str, source: str, rows: int) -> pa.Table:
    """The one-row marker that ends a shard: status `eof`, the shard's row count in C_SHARD_ROWS."""
    row = empty_row(source)
    row.update({C_STATUS: S_EOF, C_SHARD: shard, C_SHARD_ROWS: rows})
    return _to_table([row])


def normalize_records(records: Iterable[dict[str, Any]], sources: Iterable[str], spec: DocumentSpec) -> pa.Table:
    """Records (e.g. Parquet rows as dicts) -> a table of DOC_COLUMNS. Bytes values (binary
    columns) are decoded strictly as UTF-8; one that is not is a reject."""
    rows = []
    for record, source in zip(records, sources, strict=True):
        row = normalize_record(record, source, "", spec)
        if row[C_REJECT]:
            row[C_RAW] = raw_json(record)
        rows.append(row)
    return _to_table(rows)


def raw_json(record: Any) -> str:
    """A record as JSON for the rejects file, whatever it holds: bytes that are not UTF-8 and lone
    surrogates come out as escapes, so the raw column stays valid Unicode."""
    if isinstance(record, dict):
        record = {k: v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v for k, v in record.items()}
    text = json.dumps(record, default=str, ensure_ascii=False)
    # ensure_ascii=True writes a lone surrogate as its \uXXXX escape; only then is it worth the bytes.
    return text if unstorable(text) is None else json.dumps(record, default=str, ensure_ascii=True)


def mark_duplicates(table: pa.Table, counts: dict[str, int]) -> pa.Table:
    """Reject every copy of an id that appears more than once in the input (counts: id -> n)."""
    if not counts:
        return table
    ids = table.column(C_ID).to_pylist()
    rejects = table.column(C_REJECT).to_pylist()
    if not any(i in counts for i in ids):
        return table
    raws = table.column(C_RAW).to_pylist()
    texts = table.column(C_TEXT).to_pylist()
    statuses = table.column(C_STATUS).to_pylist()
    for k, doc_id in enumerate(ids):
        if doc_id in counts and not rejects[k]:
            rejects[k] = REASON_DUPLICATE.format(n=counts[doc_id])
            raws[k] = json.dumps({"id": doc_id, "text": texts[k]}, ensure_ascii=False) if not raws[k] else raws[k]
            statuses[k] = S_REJECTED
    for column, values in ((C_REJECT, rejects), (C_RAW, raws), (C_STATUS, statuses)):
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.string()))
    return table


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut text to at most max_bytes of UTF-8 without splitting a character."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")
