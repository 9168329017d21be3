"""A Milvus Lite index file cut short (its writer killed mid-write) is rebuilt on load, not fatal.

Real Milvus Lite server, real faiss HNSW files; no model (the vectors are random: the test is
about the store's load path).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from reembed.lite import LiteServer
from reembed.store import MilvusStore

pytestmark = pytest.mark.integration
DIM = 16


def make_collection(uri: str, rows: int) -> np.ndarray:
    client = MilvusClient(uri)
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 64})
    client.create_collection("docs", schema=schema, index_params=index)
    vectors = np.random.default_rng(7).normal(size=(rows, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    client.insert("docs", [{"id": i, "vector": v.tolist()} for i, v in enumerate(vectors)])
    client.flush("docs")
    client.load_collection("docs")  # builds and writes the segment's index file
    client.close()
    return vectors


def test_a_truncated_index_file_is_rebuilt_on_load(tmp_path, caplog):
    db = tmp_path / "lite.db"
    with LiteServer(str(db)) as uri:
        vectors = make_collection(uri, 300)
    files = sorted(db.rglob("indexes/*.idx"))
    assert files, "Milvus Lite wrote no index file"
    damaged = files[0]
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[: size // 3])  # as a kill mid-write leaves it

    with LiteServer(str(db)) as uri:
        # Milvus itself refuses the collection as it is now ...
        raw = MilvusClient(uri)
        with pytest.raises(Exception, match="read error in"):
            raw.load_collection("docs")
        raw.close()
        # ... the store deletes the damaged file, Milvus Lite builds it again, and the load goes on.
        store = MilvusStore(uri)
        try:
            with caplog.at_level(logging.WARNING, logger="reembed.store"):
                store.load("docs")
            assert any(str(damaged) in r.getMessage() for r in caplog.records)
            rows = store.query("docs", "id >= 0", ["id"], limit=1000)
            assert sorted(r["id"] for r in rows) == list(range(300))
            hits = store.client.search("docs", data=[vectors[42].tolist()], limit=1, anns_field="vector")
            assert hits[0][0]["id"] == 42
        finally:
            store.close()
    assert damaged.is_file() and damaged.stat().st_size == size
