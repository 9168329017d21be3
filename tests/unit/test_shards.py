"""Input shards and the resume record: every line exactly once however files are cut, end-of-shard
counts, recorded shards skipped only while their file is unchanged, torn records ignored."""

import io
import json
import os
import random
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reembed.documents import (
    C_ID,
    C_REJECT,
    C_SHARD,
    C_SHARD_ROWS,
    C_STATUS,
    S_EOF,
    S_ERROR,
    S_NEW,
    S_REJECTED,
    DocumentSpec,
)
from reembed.inputs import list_input_files
from reembed.shards import UTF8_BOM, Shard, auto_shard_bytes, iter_lines_in_range, plan_shards, read_shard
from reembed.state import ShardLog, run_key


def test_byte_ranges_give_every_line_exactly_once():
    rng = random.Random(7)
    lines = [("x" * rng.randint(0, 40)).encode() for _ in range(300)]
    data = b"\n".join(lines)  # no newline at the end: the last line still counts
    for _ in range(50):
        cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randint(1, 12)))})
        got = []
        for start, end in zip(cuts, cuts[1:], strict=False):
            got.extend(iter_lines_in_range(io.BytesIO(data), start, end, chunk=rng.choice([1, 7, 64, 4096])))
        assert got == lines


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_all(fs, shards, spec=None):
    tables = [t for s in shards for t in read_shard(fs, s, spec or DocumentSpec())]
    return pa.concat_tables(tables).to_pylist()


def test_shards_end_with_their_row_count_and_keep_bad_lines_as_rejects(tmp_path):
    rows = [{"_id": str(i), "text": f"doc {i}"} for i in range(100)]
    path = write_lines(tmp_path / "a.jsonl", [*rows[:50], "", "{broken", *rows[50:]])
    with open(path, "ab") as fh:
        fh.write(b'{"_id": "latin", "text": "caf\xe9"}\n')  # not UTF-8
    plan = list_input_files(str(path))
    shards, done = plan_shards(plan, shard_bytes=500)
    assert len(shards) > 5 and not done
    out = read_all(plan.filesystem, shards)
    eofs = [r for r in out if r[C_STATUS] == S_EOF]
    assert sorted(r[C_SHARD] for r in eofs) == sorted(s.key for s in shards)
    body = [r for r in out if r[C_STATUS] != S_EOF]
    assert sum(r[C_SHARD_ROWS] for r in eofs) == len(body) == 102  # blank line skipped
    assert [r[C_ID] for r in body if r[C_STATUS] == S_NEW] == [str(i) for i in range(100)]
    reasons = sorted(r[C_REJECT].split(":")[0] for r in body if r[C_STATUS] == S_REJECTED)
    assert reasons == ["bad JSON", "bad encoding"]


def test_parquet_shards_are_row_group_ranges(tmp_path):
    table = pa.table({"_id": [str(i) for i in range(40)], "text": [f"t{i}" for i in range(40)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=5)
    plan = list_input_files(str(tmp_path))
    shards, _ = plan_shards(plan, shard_bytes=1)  # one row group each
    assert [(s.start, s.end) for s in shards] == [(i, i + 1) for i in range(8)]
    ids = [r[C_ID] for r in read_all(plan.filesystem, shards) if r[C_STATUS] == S_NEW]
    assert ids == [str(i) for i in range(40)]


def test_recorded_shards_are_skipped_until_their_file_changes(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [{"_id": str(i), "text": "x"} for i in range(200)])
    write_lines(tmp_path / "b.jsonl", [{"_id": f"b{i}", "text": "y"} for i in range(200)])
    plan = list_input_files(str(tmp_path))
    log = ShardLog(tmp_path / "state" / "shards.jsonl", run_key({"collection": "c"}))
    shards, _ = plan_shards(plan, 1000, log)
    log.record([(s, 1) for s in shards[:3]], "run1")

    again = ShardLog(tmp_path / "state" / "shards.jsonl", run_key({"collection": "c"}))
    todo, done = plan_shards(list_input_files(str(tmp_path)), 4000, again)  # another shard size
    assert {s.key for s in done} == {s.key for s in shards[:3]}
    covered = sorted((s.path, s.start, s.end) for s in todo + done)
    for path in {s.path for s in shards}:  # the file is still covered exactly, without overlap
        ranges = [(st, en) for p, st, en in covered if p == path]
        assert ranges[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:], strict=False))
        assert ranges[-1][1] == os.path.getsize(path)

    other = ShardLog(tmp_path / "state" / "shards.jsonl", run_key({"collection": "other"}))
    assert not plan_shards(list_input_files(str(tmp_path)), 1000, other)[1]  # another run key: nothing done

    with open(a, "a") as fh:  # the file changed: its recorded shards no longer count
        fh.write(json.dumps({"_id": "new", "text": "z"}) + "\n")
    todo, done = plan_shards(list_input_files(str(tmp_path)), 1000, again)
    assert not [s for s in done if s.path == str(a)]


def test_a_torn_last_record_is_ignored_and_appends_stay_readable(tmp_path):
    path = tmp_path / "shards.jsonl"
    log = ShardLog(path, "k")
    shard = Shard("/x.jsonl", "jsonl", 0, 10, 10, 1)
    log.record([(shard, 3)], "r1")
    with open(path, "a") as fh:
        fh.write('{"path": "/y.jsonl", "st')  # a crash mid-append
    log2 = ShardLog(path, "k")
    assert log2.done_shards("/x.jsonl", 10, 1) == [shard]
    log2.record([(Shard("/z.jsonl", "jsonl", 0, 5, 5, 1), 1)], "r2")
    assert ShardLog(path, "k").done_shards("/z.jsonl", 5, 1)


def test_an_unreadable_shard_ends_with_an_error_marker_naming_it(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{"_id": "1", "text": "x"}])
    plan = list_input_files(str(path))
    shards, _ = plan_shards(plan, 1 << 20)
    path.unlink()
    (row,) = read_all(pafs.LocalFileSystem(), shards)
    assert row[C_STATUS] == S_ERROR and row[C_SHARD] == shards[0].key
    assert re.match(r"shard .*a\.jsonl#0-\d+: cannot read", row[C_REJECT])


def test_a_corrupt_parquet_row_group_fails_only_its_shard(tmp_path):
    table = pa.table({"_id": [str(i) for i in range(30)], "text": [f"text {i}" * 20 for i in range(30)]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=10, compression="snappy")
    corrupt_row_group(path, 1)
    plan = list_input_files(str(tmp_path))
    shards, _ = plan_shards(plan, shard_bytes=1)
    out = read_all(plan.filesystem, shards)
    assert [r[C_SHARD] for r in out if r[C_STATUS] == S_ERROR] == [shards[1].key]
    assert sorted(r[C_SHARD] for r in out if r[C_STATUS] == S_EOF) == sorted([shards[0].key, shards[2].key])


def corrupt_row_group(path, index: int) -> None:
    """Overwrite the data of one row group with garbage; the footer (schema, metadata) stays readable."""
    meta = pq.ParquetFile(path).metadata.row_group(index)
    columns = [meta.column(c) for c in range(meta.num_columns)]
    start = min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in columns)
    size = sum(c.total_compressed_size for c in columns)
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(bytes(random.Random(1).randrange(256) for _ in range(size)))


def test_auto_shard_size_gives_each_actor_several_shards_within_bounds():
    assert auto_shard_bytes(1_500_000, 2) == 93_750
    assert auto_shard_bytes(10, 2) == 64 << 10
    assert auto_shard_bytes(10**12, 4) == 64 << 20


def test_a_bad_row_costs_only_itself_not_its_shard(tmp_path):
    """The issue's shard: ~60 documents, one with a lone surrogate escape in its text (valid JSON)."""
    rows = [json.dumps({"_id": str(i), "text": f"doc {i}"}) for i in range(60)]
    rows[30] = '{"_id": "30", "text": "a\\ud800 b"}'
    path = write_lines(tmp_path / "a.jsonl", rows)
    plan = list_input_files(str(path))
    shards, _ = plan_shards(plan, 1 << 20)
    out = read_all(plan.filesystem, shards)
    assert [r[C_STATUS] for r in out].count(S_ERROR) == 0
    assert out[-1][C_STATUS] == S_EOF and out[-1][C_SHARD_ROWS] == 60
    (reject,) = [r for r in out if r[C_STATUS] == S_REJECTED]
    assert reject[C_ID] == "30" and reject[C_REJECT].startswith("bad text: field 'text'")
    assert [r[C_ID] for r in out if r[C_STATUS] == S_NEW] == [str(i) for i in range(60) if i != 30]


def test_a_byte_order_mark_is_skipped_at_the_start_of_a_file_only(tmp_path):
    first, second = json.dumps({"_id": "1", "text": "one"}), json.dumps({"_id": "2", "text": "two"})
    path = tmp_path / "bom.jsonl"
    path.write_bytes(UTF8_BOM + first.encode() + b"\n" + UTF8_BOM + second.encode() + b"\n")
    size = path.stat().st_size
    # However the file is cut, the mark at offset 0 is skipped and the one inside is a reject.
    for cuts in ([0, size], [0, 1, size], [0, 2, 5, size], [0, len(first) + 4, len(first) + 5, size]):
        shards = [Shard(str(path), "jsonl", s, e, size, 0) for s, e in zip(cuts, cuts[1:], strict=False)]
        body = [r for r in read_all(pafs.LocalFileSystem(), shards) if r[C_STATUS] != S_EOF]
        assert [(r[C_ID], r[C_STATUS]) for r in body] == [("1", S_NEW), ("", S_REJECTED)], cuts
        assert body[1][C_REJECT].startswith("bad JSON")
    path.write_bytes(UTF8_BOM + b"\n" + first.encode())  # a mark alone on the first line: a blank line
    (row, eof) = read_all(pafs.LocalFileSystem(), [Shard(str(path), "jsonl", 0, 100, 100, 0)])
    assert row[C_ID] == "1" and eof[C_SHARD_ROWS] == 1


def test_parquet_strings_that_are_not_utf8_are_rejects_of_their_own_rows(tmp_path):
    """Parquet does not check that a string column holds UTF-8; Arrow fails the whole batch on one."""
    texts = pa.array([b"fine", b"caf\xe9", b"\xed\xa0\x80", "d\u00e9j\u00e0".encode()], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"_id": ["a", "b", "c", "d"], "text": texts}), tmp_path / "p.parquet")
    binary = pa.table({"_id": pa.array([b"e", b"\xff"], pa.binary()), "text": pa.array([b"ok", b"ok"], pa.binary())})
    pq.write_table(binary, tmp_path / "q.parquet")
    plan = list_input_files(str(tmp_path))
    shards, _ = plan_shards(plan, 1 << 20)
    out = [r for r in read_all(plan.filesystem, shards) if r[C_STATUS] != S_EOF]
    assert [(r[C_ID], r["text"]) for r in out if r[C_STATUS] == S_NEW] == [("a", "fine"), ("d", "déjà"), ("e", "ok")]
    reasons = [r[C_REJECT] for r in out if r[C_STATUS] == S_REJECTED]
    assert reasons == [
        "bad encoding: field 'text' is not valid UTF-8 (unexpected end of data at byte 3)",
        "bad encoding: field 'text' is not valid UTF-8 (invalid continuation byte at byte 0)",
        "bad encoding: field '_id' is not valid UTF-8 (invalid start byte at byte 0)",
    ]
