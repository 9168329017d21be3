"""The backup's file side in plain calls: rows <-> Arrow for each field type, files that roll over at
a row budget, and a manifest that refuses unfinished or altered backups."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from reembed.backup import MANIFEST_NAME, FieldSpec, _from_arrow, _RollingParquet, _to_arrow, read_manifest
from reembed.errors import CapabilityError, ConfigError

FIELDS = [
    FieldSpec("id", "VARCHAR", {"max_length": 64}, True),
    FieldSpec("vector", "FLOAT_VECTOR", {"dim": 3}),
    FieldSpec("codes", "INT8_VECTOR", {"dim": 2}),
    FieldSpec("n", "INT64", {}),
    FieldSpec("meta", "JSON", {}),
]
SCHEMA = pa.schema([pa.field(f.name, f.arrow_type(), nullable=False) for f in FIELDS])


def rows(n: int) -> list[dict]:
    return [
        {
            "id": f"d{i}",
            "vector": [float(i), -1.5, 127.0],  # int8 codes stored as floats, as Milvus returns them
            # INT8_VECTOR as pymilvus may hand it back: bytes, [bytes] or a list of numbers
            "codes": [np.array([i, -i], np.int8).tobytes(), [np.array([i, -i], np.int8).tobytes()], [i, -i]][i % 3],
            "n": i,
            "meta": {"k": [i]},
        }
        for i in range(n)
    ]


def test_rows_survive_arrow_both_ways():
    table = _to_arrow(rows(5), FIELDS, SCHEMA)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 3)
    assert table.schema.field("codes").type == pa.list_(pa.int8(), 2)
    back = _from_arrow(table.to_batches()[0], FIELDS)
    assert [r["id"] for r in _from_arrow(table.slice(2, 2).to_batches()[0], FIELDS)] == ["d2", "d3"]
    assert _from_arrow(table.slice(2, 2).to_batches()[0], FIELDS)[1]["vector"].tolist() == [3.0, -1.5, 127.0]
    assert [r["id"] for r in back] == [f"d{i}" for i in range(5)]
    assert back[3]["vector"].dtype == np.float32 and back[3]["vector"].tolist() == [3.0, -1.5, 127.0]
    assert back[3]["codes"].dtype == np.int8 and back[3]["codes"].tolist() == [3, -3]
    assert back[4]["codes"].tolist() == [4, -4]
    assert back[2]["meta"] == {"k": [2]} and back[2]["n"] == 2


def test_unsupported_field_type_is_refused_by_name():
    with pytest.raises(CapabilityError, match="field 'v': type SPARSE_FLOAT_VECTOR"):
        FieldSpec("v", "SPARSE_FLOAT_VECTOR", {}).arrow_type()


def test_files_roll_over_at_the_row_budget(tmp_path):
    writer = _RollingParquet(tmp_path / "p", SCHEMA, rows_per_file=4)
    for start in range(0, 10, 3):  # batches of 3 cross file boundaries
        writer.write(_to_arrow(rows(10)[start : start + 3], FIELDS, SCHEMA))
    writer.close()
    assert [f["rows"] for f in writer.files] == [4, 4, 2]
    assert [f["path"].name for f in writer.files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    import pyarrow.parquet as pq

    ids = [i for f in writer.files for i in pq.read_table(f["path"]).column("id").to_pylist()]
    assert ids == [f"d{i}" for i in range(10)]


def test_unfinished_or_altered_backups_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no backup.json"):
        read_manifest(tmp_path)
    writer = _RollingParquet(tmp_path / "partitions" / "_default", SCHEMA, rows_per_file=100)
    writer.write(_to_arrow(rows(3), FIELDS, SCHEMA))
    writer.close()
    from reembed.backup import _sha256

    path = writer.files[0]["path"]
    entry = {"path": str(path.relative_to(tmp_path)), "rows": 3, "sha256": _sha256(path)}
    manifest = {"format": 1, "partitions": [{"name": "_default", "rows": 3, "files": [entry]}], "rows": 3}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert read_manifest(tmp_path)["rows"] == 3
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ConfigError, match="sha256 expected"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ConfigError, match="format: expected 1, got 99"):
        read_manifest(tmp_path)
