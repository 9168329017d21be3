import dataclasses
import json

import numpy as np
import pytest

from reembed.errors import CapabilityError
from reembed.store import (
    CollectionIdentity,
    ServerCapabilities,
    _chunks_by_bytes,
    damaged_lite_index,
    metric_for,
    vector_payload,
)


def test_capabilities_follow_server_version():
    lite = ServerCapabilities.from_version("milvus_lite-3.2.2")
    assert lite.is_lite and not lite.int8_vector and not lite.binary_vector
    assert lite.vector_type_for("int8") == "FLOAT_VECTOR"
    assert "no INT8_VECTOR" in lite.fallback_note("int8")
    old = ServerCapabilities.from_version("v2.3.5-lite")  # the `milvus` package's server says "-lite" too
    assert not old.is_lite and old.binary_vector and not old.int8_vector
    new = ServerCapabilities.from_version("v2.6.1")
    assert new.int8_vector and new.vector_type_for("int8") == "INT8_VECTOR" and new.fallback_note("int8") is None
    assert new.vector_type_for("float32") == "FLOAT_VECTOR"


def identity(**model) -> CollectionIdentity:
    base = {"name": "m", "weights_sha256": "abc", "dimension": 384, "normalize": True}
    return CollectionIdentity(
        model={**base, **model},
        precision="int8",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        partitioning={"scheme": "hash", "partitions": 1},
        hnsw={"M": 32, "efConstruction": 200},
    )


def test_identity_differences_name_what_differs():
    assert identity().differences(identity()) == []
    diffs = identity().differences(identity(dimension=768, name="other"))
    assert "model.name: collection has 'm', this run has 'other'" in diffs
    assert "model.dimension: collection has 384, this run has 768" in diffs
    assert CollectionIdentity.from_json(identity().to_json()) == identity()


def test_requests_are_chunked_under_byte_budget():
    rows = [{"id": str(i), "vector": np.zeros(100, np.float32), "text": "x" * 600} for i in range(10)]
    chunks = list(_chunks_by_bytes(rows, 2500))
    assert sum(len(c) for c in chunks) == 10 and all(len(c) <= 2 for c in chunks)


@pytest.mark.parametrize(("vtype", "dtype"), [("INT8_VECTOR", np.int8), ("FLOAT_VECTOR", np.float32)])
def test_vector_payload_dtype(vtype, dtype):
    out = vector_payload(np.array([[1, -2]], dtype=np.int8), vtype)
    assert out[0].dtype == dtype and out[0].tolist() == [1, -2]


def test_binary_is_refused_where_there_is_no_binary_vector():
    lite = ServerCapabilities.from_version("milvus_lite-3.2.2")
    with pytest.raises(CapabilityError, match="BINARY_VECTOR.*not emulated"):
        lite.vector_type_for("binary")
    assert ServerCapabilities.from_version("v2.3.5-lite").vector_type_for("binary") == "BINARY_VECTOR"


def test_binary_payload_is_packed_bytes_and_searched_by_hamming():
    bits = np.array([[0b10100101, 0xFF], [0, 1]], dtype=np.uint8)
    assert vector_payload(bits, "BINARY_VECTOR") == [b"\xa5\xff", b"\x00\x01"]
    with pytest.raises(ValueError, match="packed uint8"):
        vector_payload(np.zeros((1, 16), np.float32), "BINARY_VECTOR")
    assert metric_for("BINARY_VECTOR") == "HAMMING"
    assert metric_for("FLOAT_VECTOR") == metric_for("INT8_VECTOR") == "IP"


def test_identity_without_rerank_reads_as_none_and_rerank_must_match():
    old = json.loads(identity().to_json())
    del old["rerank"]  # written before re-rank copies existed
    assert CollectionIdentity.from_json(json.dumps(old)).rerank is None
    with_copies = dataclasses.replace(identity(), rerank="float16-base64")
    assert with_copies.differences(identity()) == ["rerank: collection has 'float16-base64', this run has None"]


def test_only_an_existing_index_file_named_by_a_read_error_counts_as_damaged(tmp_path):
    idx = tmp_path / "m.db" / "collections" / "c" / "partitions" / "p" / "indexes" / "data_1_2.vector.hnsw.idx"
    idx.parent.mkdir(parents=True)
    idx.write_bytes(b"x")
    message = f"Error: 'ret == (size)' failed: read error in {idx}: 3946 != 23040 (Resource temporarily unavailable)"
    assert damaged_lite_index(message) == idx
    assert damaged_lite_index(message.replace(str(idx), str(idx) + ".gone")) is None
    assert damaged_lite_index("collection not loaded") is None
    outside = tmp_path / "other.idx"
    outside.write_bytes(b"x")
    assert damaged_lite_index(f"read error in {outside}: 1 != 2") is None
