import json

import pytest

from reembed.documents import (
    C_PARTITION,
    C_REJECT,
    C_TEXT,
    DocumentSpec,
    mark_duplicates,
    normalize_json_lines,
    normalize_records,
    partition_name_for_value,
    truncate_utf8,
)


def one(line: str, spec: DocumentSpec | None = None) -> dict:
    return normalize_json_lines([line], ["f.jsonl"], spec or DocumentSpec()).to_pylist()[0]


def test_present_text_fields_are_joined_with_one_space():
    row = one(json.dumps({"_id": 7, "title": " A title ", "text": "the body"}))
    assert row["id"] == "7" and row[C_TEXT] == "A title the body" and row[C_REJECT] == ""
    assert row[C_PARTITION] == "_default" and len(row["content_sha256"]) == 64
    row = one(json.dumps({"_id": "x", "text": "only body"}))
    assert row[C_TEXT] == "only body"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"title": "t"}, "missing id"),
        ({"_id": None, "text": "t"}, "missing id"),
        ({"_id": 1.5, "text": "t"}, "bad id"),
        ({"_id": "  ", "text": "t"}, "bad id"),
        ({"_id": "a" * 600, "text": "t"}, "bad id"),
        ({"_id": "a", "title": "", "text": " "}, "missing text"),
        ({"_id": "a", "text": ["list"]}, "bad text"),
        ({"_id": "a", "text": 3}, "bad text"),
    ],
)
def test_bad_records_are_rejected_with_reason(record, reason):
    line = json.dumps(record)
    row = one(line)
    assert row[C_REJECT].startswith(reason)
    assert row["raw"] == line


def test_unparsable_line_and_non_object_are_rejected():
    assert one("{oops")[C_REJECT].startswith("bad JSON")
    assert one("[1, 2]")[C_REJECT].startswith("bad record")


def test_hash_partitions_are_stable_and_cover_range():
    spec = DocumentSpec(partitions=4)
    names = {spec.partition_for_id(str(i)) for i in range(200)}
    assert names == {"part_0000", "part_0001", "part_0002", "part_0003"}
    assert spec.partition_for_id("doc-1") == DocumentSpec(partitions=4).partition_for_id("doc-1")


def test_partition_values_become_valid_distinct_names():
    assert partition_name_for_value("en") == "en"
    a, b = partition_name_for_value("en-US"), partition_name_for_value("en_US")
    assert b == "en_US" and a.startswith("p_en_US_") and a != b
    assert partition_name_for_value("2024").startswith("p_2024_")
    spec = DocumentSpec(partition_by="lang")
    assert one(json.dumps({"_id": "1", "text": "t"}), spec)[C_REJECT].startswith("bad partition")


def test_parquet_records_get_raw_only_when_rejected():
    table = normalize_records([{"_id": "1", "text": "ok"}, {"_id": "2", "text": 5}], ["a", "b"], DocumentSpec())
    rows = table.to_pylist()
    assert rows[0]["raw"] == "" and json.loads(rows[1]["raw"]) == {"_id": "2", "text": 5}


def test_duplicates_reject_every_copy():
    lines = [
        json.dumps({"_id": "d", "text": "one"}),
        json.dumps({"_id": "d", "text": "two"}),
        json.dumps({"_id": "u", "text": "unique"}),
    ]
    table = mark_duplicates(normalize_json_lines(lines, ["f"] * 3, DocumentSpec()), {"d": 2})
    rows = table.to_pylist()
    assert [r[C_REJECT].startswith("duplicate id") for r in rows] == [True, True, False]
    assert json.loads(rows[1]["raw"])["text"] == "two"


def test_truncate_utf8_never_splits_a_character():
    assert truncate_utf8("héllo", 2) == "h"
    assert truncate_utf8("héllo", 3) == "hé"
    assert truncate_utf8("abc", 10) == "abc"
