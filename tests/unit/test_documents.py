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
    raw_json,
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
        ({"_id": "", "text": "t"}, "bad id"),
        ({"_id": "a" * 600, "text": "t"}, "bad id"),
        ({"_id": "é" * 257, "text": "t"}, "bad id"),  # 257 characters, 514 bytes
        ({"_id": "a\ud800", "text": "t"}, "bad id"),
        ({"_id": "a", "title": "", "text": " "}, "missing text"),
        ({"_id": "a", "text": ["list"]}, "bad text"),
        ({"_id": "a", "text": 3}, "bad text"),
        ({"_id": "a", "text": "a\ud800 b"}, "bad text"),
        ({"_id": "a", "title": "\udfff", "text": "fine"}, "bad text"),
    ],
)
def test_bad_records_are_rejected_with_reason(record, reason):
    line = json.dumps(record)
    row = one(line)
    assert row[C_REJECT].startswith(reason + ":")
    assert row["raw"] == line


def test_a_lone_surrogate_is_one_reject_naming_field_and_place_and_the_table_stays_valid():
    """The issue's line: valid JSON whose text holds a lone surrogate used to fail its whole shard."""
    lines = [
        json.dumps({"_id": "0", "text": "before"}),
        '{"_id": "1", "text": "a\\ud800 b"}',
        '{"_id": "2\\udc00", "text": "t"}',
        json.dumps({"_id": "3", "text": "after"}),
    ]
    rows = normalize_json_lines(lines, ["f"] * 4, DocumentSpec()).to_pylist()
    assert [r[C_REJECT] for r in rows[::3]] == ["", ""]
    assert rows[1][C_REJECT] == (
        "bad text: field 'text' cannot be stored or embedded: lone surrogate '\\ud800' at character 1 "
        "(not valid Unicode)"
    )
    assert rows[1]["id"] == "1" and rows[1]["raw"] == lines[1]
    assert rows[2][C_REJECT].startswith("bad id: field '_id' cannot be stored: lone surrogate '\\udc00'")
    assert rows[2]["id"] == "" and rows[2]["raw"] == lines[2]  # an id Arrow cannot hold lives on in raw


@pytest.mark.parametrize(
    "doc_id", [" ", "  padded  ", "\t", "\x00", 'say "hi"', "back\\slash", "😀", "ＩＤ", "a\u2028b"]
)
def test_any_non_empty_string_is_an_id_kept_exactly(doc_id):
    row = one(json.dumps({"_id": doc_id, "text": "t"}))
    assert row[C_REJECT] == "" and row["id"] == doc_id
    row = one(json.dumps({"_id": doc_id, "text": "t"}, ensure_ascii=False))
    assert row[C_REJECT] == "" and row["id"] == doc_id


def test_integer_ids_are_their_decimal_string_and_the_byte_limit_is_exact():
    assert one(json.dumps({"_id": -12, "text": "t"}))["id"] == "-12"
    assert one(json.dumps({"_id": "é" * 256, "text": "t"}))[C_REJECT] == ""  # 512 bytes: fits
    reason = one(json.dumps({"_id": "é" * 257, "text": "t"}))[C_REJECT]
    assert reason == "bad id: field '_id' must be at most 512 bytes in UTF-8, got 514"


def test_raw_control_characters_inside_strings_are_text_kept_inside():
    """Form feeds from PDF extraction, raw tabs: JSON forbids them unescaped, the job reads them."""
    line = '{"_id": "p1", "title": "\tTitle\x0c", "text": "page one\x0cpage\ttwo\x01 \r\n"}'
    row = one(line)
    assert row[C_REJECT] == "" and row[C_TEXT] == "Title page one\x0cpage\ttwo\x01"


def test_a_surrogate_in_the_partition_field_is_a_bad_partition():
    spec = DocumentSpec(partition_by="lang")
    row = one('{"_id": "1", "text": "t", "lang": "e\\ud800n"}', spec)
    assert row[C_REJECT].startswith("bad partition: field 'lang' cannot be stored: lone surrogate")
    assert one(json.dumps({"_id": "1", "text": "t", "lang": "en"}), spec)[C_PARTITION] == "en"


def test_deep_nesting_is_bad_json_not_a_crash():
    row = one("[" * 100_000)
    assert row[C_REJECT].startswith("bad JSON: RecursionError")


def test_a_byte_order_mark_inside_a_line_is_bad_json():
    assert one("\ufeff" + json.dumps({"_id": "1", "text": "t"}))[C_REJECT].startswith("bad JSON")


def test_parquet_bytes_values_are_decoded_strictly():
    records = [
        {"_id": b"b1", "text": "caf\u00e9".encode()},
        {"_id": "b2", "text": b"caf\xe9"},
        {"_id": b"\xff", "text": "t"},
        {"_id": "b4", "text": "t", "lang": b"\xed\xa0\x80"},  # a surrogate encoded: not UTF-8
    ]
    rows = normalize_records(records, ["p"] * 4, DocumentSpec()).to_pylist()
    assert rows[0]["id"] == "b1" and rows[0][C_TEXT] == "caf\u00e9"
    assert rows[1][C_REJECT] == "bad encoding: field 'text' is not valid UTF-8 (unexpected end of data at byte 3)"
    assert json.loads(rows[1]["raw"]) == {"_id": "b2", "text": "caf\\xe9"}
    assert rows[2][C_REJECT].startswith("bad encoding: field '_id'")
    lang = normalize_records(records[3:], ["p"], DocumentSpec(partition_by="lang")).to_pylist()[0]
    assert lang[C_REJECT].startswith("bad encoding: field 'lang'")


def test_raw_json_of_a_record_is_always_valid_unicode():
    assert raw_json({"a": "\ud800x", "b": "é"}) == '{"a": "\\ud800x", "b": "\\u00e9"}'
    assert raw_json({"a": "é"}) == '{"a": "é"}'


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
