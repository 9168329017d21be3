"""Whatever a JSONL file holds, reading it never fails a shard: every record is one row, a document
or a reject with a reason, and a document's id and text are exactly what the record says.

Lines are drawn the way real files go wrong: ids and texts over all of Unicode with lone
surrogates (valid JSON as escapes, invalid UTF-8 when written raw), control characters raw inside
strings, quotes, emoji, byte-order marks, bytes that are no UTF-8 at all, cut-off and non-object
JSON, values of the wrong type. The expected row of each record is worked out from the spec here,
independently of reembed.documents, and the file is read through `read_shard` cut at random places.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reembed.documents import (
    C_ID,
    C_RAW,
    C_REJECT,
    C_SHARD_ROWS,
    C_STATUS,
    C_TEXT,
    S_EOF,
    S_NEW,
    S_REJECTED,
    DocumentSpec,
)
from reembed.shards import UTF8_BOM, Shard, read_shard
from reembed.store import ID_MAX_BYTES
from tests.strategies import TRICKY_CHARS, fill_to_bytes, ids, texts

SPEC = DocumentSpec()  # id "_id", text fields "title" and "text"
REASON_CLASSES = {"missing id", "bad id", "missing text", "bad text", "bad encoding", "bad JSON", "bad record"}

SURROGATES = "\ud800\udbff\udc00\udfff"
# Every code point, surrogates included, and the ones that break readers drawn often.
_char = st.one_of(st.characters(codec=None, exclude_categories=()), st.sampled_from(TRICKY_CHARS + "\ufeff"))
_wild_text = st.lists(_char, max_size=16).map("".join)
# Drawn as often as the rest: a lone surrogate is what the issue saw fail a whole shard.
_with_surrogate = st.builds(lambda a, s, b: a + s + b, _wild_text, st.sampled_from(SURROGATES), _wild_text)
_string = st.one_of(_wild_text, _with_surrogate, texts(), ids())
_value = st.one_of(
    _string,
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False),
    st.lists(_string, max_size=2),
    st.dictionaries(_string, _string, max_size=1),
)
# Ids of exactly the id field's byte limit, or a byte or a few over it, in 1- to 4-byte characters.
_long_id = st.builds(
    fill_to_bytes,
    texts(),
    st.sampled_from(["a", "é", "日", "😀"]),
    st.sampled_from([ID_MAX_BYTES - 1, ID_MAX_BYTES, ID_MAX_BYTES + 1, ID_MAX_BYTES + 3]),
)
_id_value = st.one_of(_string, _string, _long_id, st.just(""), st.integers(-(10**30), 10**30), _value)
# Mostly records shaped like documents (so that the values inside decide), some of any shape.
_document_like = st.fixed_dictionaries(
    {"_id": st.one_of(_string, _string, _long_id, st.integers(-(10**30), 10**30)), "text": _string},
    optional={"title": st.one_of(_string, st.none()), "lang": _string},
)
_any_shape = st.fixed_dictionaries(
    {}, optional={"_id": _id_value, "title": st.one_of(_string, _value), "text": st.one_of(_string, _value)}
)
_record = st.one_of(_document_like, _document_like, _document_like, _any_shape)


def _loose_literal(value: str) -> str:
    """A JSON string with every control character but the newline left raw (strict=False reads it)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _loose(obj: object) -> str:
    if isinstance(obj, str):
        return _loose_literal(obj)
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{_loose(k)}: {_loose(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(_loose(v) for v in obj) + "]"
    return json.dumps(obj)


def _encoded(text: str) -> bytes:
    # surrogatepass writes a lone surrogate as the 3 bytes it would take: not valid UTF-8.
    return text.encode("utf-8", "surrogatepass")


_line = st.one_of(
    _record.map(lambda r: json.dumps(r).encode()),  # ASCII, surrogates as \ud800 escapes
    _record.map(lambda r: json.dumps(r).encode()),
    _record.map(lambda r: _encoded(json.dumps(r, ensure_ascii=False))),
    _record.map(lambda r: _encoded(_loose(r))),
    _record.map(lambda r: _encoded(_loose(r))),
    _record.map(lambda r: UTF8_BOM + json.dumps(r).encode()),  # a mark that is not at the file's start
    st.tuples(_record, st.integers(0, 40)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),  # cut off
    _value.map(lambda v: json.dumps(v).encode()),  # JSON, but not an object
    st.binary(max_size=24),
    st.sampled_from([b"", b"   ", b"\t\r", b"\x0c", b"[" * 5000, b"{}", b"null", b'{"_id": "a", "text": "x"}']),
).map(lambda line: line.replace(b"\n", b""))


def _expected(record: object) -> tuple[str, str] | None:
    """(id, text) of a record that is a document by the spec, None for one that must be rejected."""
    if not isinstance(record, dict):
        return None
    doc_id = record.get("_id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return None
    doc_id = str(doc_id)
    if doc_id == "" or _has_surrogate(doc_id) or len(doc_id.encode()) > ID_MAX_BYTES:
        return None
    parts = []
    for field in SPEC.text_fields:
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or _has_surrogate(value):
            return None
        if value.strip():
            parts.append(value.strip())
    return (doc_id, " ".join(parts)) if parts else None


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _parse(line: bytes) -> object:
    try:
        return json.loads(line.decode("utf-8"), strict=False)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("rows")


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    lines=st.lists(_line, min_size=1, max_size=12),
    bom=st.booleans(),
    trailing_newline=st.booleans(),
    cuts=st.lists(st.floats(0, 1), max_size=3),
)
def test_every_record_is_one_row_and_documents_are_exactly_their_record(workdir, lines, bom, trailing_newline, cuts):
    data = (UTF8_BOM if bom else b"") + b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path = workdir / "input.jsonl"
    path.write_bytes(data)
    # The spec's records: one per non-blank line; a byte-order mark is skipped at the file's start only.
    records = []
    for k, line in enumerate(data.split(b"\n")):
        if k == 0 and line.startswith(UTF8_BOM):
            line = line[len(UTF8_BOM) :]
        if line.strip():
            records.append(line)

    offsets = sorted({0, len(data), *(int(f * len(data)) for f in cuts)})
    shards = [Shard(str(path), "jsonl", s, e, len(data), 0) for s, e in zip(offsets, offsets[1:], strict=False)]
    tables = [t for shard in shards for t in read_shard(pafs.LocalFileSystem(), shard, SPEC)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []

    eofs = [r for r in rows if r[C_STATUS] == S_EOF]
    body = [r for r in rows if r[C_STATUS] != S_EOF]
    assert len(eofs) == len(shards)  # no shard ended in an error
    assert sum(r[C_SHARD_ROWS] for r in eofs) == len(body) == len(records)
    for row, line in zip(body, records, strict=True):
        record = _parse(line)
        expected = _expected(record)
        if expected is None:
            assert row[C_STATUS] == S_REJECTED, (line, row)
            assert row[C_REJECT].split(":")[0] in REASON_CLASSES, row[C_REJECT]
            assert row[C_REJECT] and row[C_RAW]
            # "bad record" is for a value that is no object; any object's fault is named precisely.
            assert not (isinstance(record, dict) and row[C_REJECT].startswith("bad record")), row[C_REJECT]
        else:
            assert row[C_STATUS] == S_NEW and row[C_REJECT] == "", (line, row)
            assert (row[C_ID], row[C_TEXT]) == expected
