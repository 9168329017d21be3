"""Backup and restore for real, on Milvus Lite and on the Milvus 2.3.5 server, through the CLI.

The collections are made with the job's own store and writer (MilvusStore.create_collection +
BatchWriter, the identity property included) from int8 codes drawn at random: the test is about
moving rows, not about the model, so it loads none.
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from jobs.backup import main
from reembed.backup import iter_partition_rows
from reembed.documents import (
    C_HASH,
    C_ID,
    C_PARTITION,
    C_RAW,
    C_REJECT,
    C_SHARD,
    C_SOURCE,
    C_STATUS,
    C_TEXT,
    S_NEW,
    content_hash,
)
from reembed.ingest import C_VECTOR, BatchWriter
from reembed.quantize import fit_int8
from reembed.store import (
    F_HASH,
    F_ID,
    F_PARTITION,
    F_TEXT,
    F_VECTOR,
    IDENTITY_PROPERTY,
    CollectionIdentity,
    MilvusStore,
)

DIM = 384
PARTITIONS = ["part_0000", "part_0001", "part_0002"]
FIELDS = [F_ID, F_VECTOR, F_TEXT, F_HASH, F_PARTITION]

pytestmark = pytest.mark.integration


def make_collection(uri: str, name: str, rows: int = 2_400) -> None:
    """A reembed collection of `rows` documents over three hash partitions, written as the job writes."""
    rng = np.random.default_rng(7)
    floats = rng.standard_normal((rows, DIM)).astype(np.float32)
    floats /= np.linalg.norm(floats, axis=1, keepdims=True)
    calibration = fit_int8(floats[:256], "global", 0.9999)
    identity = CollectionIdentity(
        model={
            "name": "test/model",
            "revision": "r1",
            "weights_sha256": "ab" * 32,
            "dimension": DIM,
            "normalize": True,
        },
        precision="int8",
        vector_type="FLOAT_VECTOR",
        calibration=calibration.to_json(),
        partitioning={"scheme": "hash", "partitions": len(PARTITIONS)},
        hnsw={"M": 16, "efConstruction": 64},
    )
    store = MilvusStore(uri)
    try:
        store.create_collection(name, identity, max_text_bytes=2048)
        store.ensure_partitions(name, PARTITIONS)
    finally:
        store.close()
    texts = [f"document {i}: ünïcödé text, {'long ' * (i % 50)}" for i in range(rows)]
    batch = {
        C_ID: np.array([f"doc-{i:05d}" for i in range(rows)], dtype=object),
        C_TEXT: np.array(texts, dtype=object),
        C_PARTITION: np.array([PARTITIONS[i % 3] for i in range(rows)], dtype=object),
        C_HASH: np.array([content_hash(t) for t in texts], dtype=object),
        C_SOURCE: np.array(["gen"] * rows, dtype=object),
        C_REJECT: np.array([""] * rows, dtype=object),
        C_RAW: np.array([""] * rows, dtype=object),
        C_STATUS: np.array([S_NEW] * rows, dtype=object),
        C_SHARD: np.array(["gen"] * rows, dtype=object),
        C_VECTOR: calibration.quantize(floats),
    }
    writer = BatchWriter(uri, None, name, "FLOAT_VECTOR", 2048)
    summary = writer(batch)
    writer.store.flush(name)
    writer.store.close()
    assert sum(summary["count"]) == rows


def snapshot_rows(uri: str, name: str) -> dict[str, dict[str, tuple]]:
    """{partition: {id: (vector, text, hash, partition)}} read back with the same iterator."""
    store = MilvusStore(uri)
    try:
        store.load(name)
        out = {}
        for partition in store.list_partitions(name):
            rows = {}
            for batch in iter_partition_rows(store, name, partition, FIELDS, 500):
                for r in batch:
                    rows[r[F_ID]] = (
                        tuple(np.asarray(r[F_VECTOR], np.float32).tolist()),
                        r[F_TEXT],
                        r[F_HASH],
                        r[F_PARTITION],
                    )
            out[partition] = rows
        return out
    finally:
        store.close()


def describe(uri: str, name: str) -> tuple[dict, dict]:
    store = MilvusStore(uri)
    try:
        desc = store.client.describe_collection(name)
        index = store.client.describe_index(name, store.client.list_indexes(name)[0])
        return desc, index
    finally:
        store.close()


def run_cli(argv: list[str], capsys) -> tuple[int, dict]:
    code = main(argv)
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def check_round_trip(uri: str, tmp_path, capsys, source: str = "docs") -> None:
    backup_dir = tmp_path / "backup"
    tracemalloc.start()
    code, snap = run_cli(
        ["snapshot", "--milvus-uri", uri, "--collection", source, "--out", str(backup_dir)]
        + ["--rows-per-file", "300", "--batch-rows", "200"],
        capsys,
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert code == 0, snap
    assert snap["rows"] == 2_400 and snap["partitions"] == {"_default": 0, **dict.fromkeys(PARTITIONS, 800)}
    assert snap["files"] == 3 * 3  # 800 rows a partition in files of 300
    # Streamed: the vectors alone, as the Python floats pymilvus returns, would take ~30 MB.
    assert peak < 12 << 20, f"peak traced memory {peak / 2**20:.1f} MiB"
    manifest = json.loads((backup_dir / "backup.json").read_text())
    assert IDENTITY_PROPERTY in manifest["properties"]

    code, restored = run_cli(
        [
            "restore",
            "--milvus-uri",
            uri,
            "--from",
            str(backup_dir),
            "--collection",
            "docs_restored",
            "--alias",
            "docs_live",
        ],
        capsys,
    )
    assert code == 0, restored
    assert restored["rows"] == 2_400 and restored["model"] == "test/model"

    before, after = snapshot_rows(uri, source), snapshot_rows(uri, "docs_restored")
    assert after == before  # same partitions, same ids in each, identical vectors, texts and hashes
    desc_a, index_a = describe(uri, source)
    desc_b, index_b = describe(uri, "docs_restored")
    assert desc_b["properties"][IDENTITY_PROPERTY] == desc_a["properties"][IDENTITY_PROPERTY]
    assert [(f["name"], f["type"], f.get("params")) for f in desc_b["fields"]] == [
        (f["name"], f["type"], f.get("params")) for f in desc_a["fields"]
    ]
    assert (index_b["index_type"], index_b["metric_type"]) == (index_a["index_type"], index_a["metric_type"])

    store = MilvusStore(uri)
    try:
        # The alias now names the restored collection, and search works on its index.
        assert store.describe("docs_live").name == "docs_restored"
        assert store.read_identity("docs_live") == store.read_identity(source)
        probe = next(iter(before["part_0001"].items()))
        store.load("docs_restored")
        hits = store.client.search(
            "docs_restored", [list(probe[1][0])], anns_field=F_VECTOR, limit=1, search_params={"metric_type": "IP"}
        )
        assert hits[0][0]["id"] == probe[0]
    finally:
        store.close()

    # A restore never overwrites: the same name again is an input error, before anything is touched.
    code, refused = run_cli(
        ["restore", "--milvus-uri", uri, "--from", str(backup_dir), "--collection", "docs_restored"], capsys
    )
    assert code == 2 and "already exists" in refused["error"]
    # An altered file is refused before the collection is created.
    victim = backup_dir / manifest["partitions"][1]["files"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-8] + b"tampered")
    code, refused = run_cli(
        ["restore", "--milvus-uri", uri, "--from", str(backup_dir), "--collection", "docs_tampered"], capsys
    )
    assert code == 2 and "sha256" in refused["error"]
    store = MilvusStore(uri)
    try:
        assert not store.has_collection("docs_tampered")
    finally:
        store.close()


def test_backup_and_restore_on_milvus_lite(tmp_path, capsys):
    uri = str(tmp_path / "lite.db")
    make_collection(uri, "docs")
    check_round_trip(uri, tmp_path, capsys)


@pytest.mark.milvus_server
def test_backup_and_restore_on_milvus_server(tmp_path, capsys, milvus_server):
    make_collection(milvus_server, "docs")
    try:
        check_round_trip(milvus_server, tmp_path, capsys)
    finally:
        store = MilvusStore(milvus_server)
        for alias in ("docs_live",):
            if alias in store.client.list_aliases("docs_restored").get("aliases", []):
                store.client.drop_alias(alias)
        for name in ("docs", "docs_restored"):
            store.drop_collection(name)
        store.close()


@pytest.mark.milvus_server
def test_lite_backup_restores_onto_the_server(tmp_path, capsys, milvus_server):
    """Moving from the embedded default to a server: snapshot on Lite, restore on the server."""
    lite = str(tmp_path / "lite.db")
    make_collection(lite, "docs", rows=600)
    code, _ = run_cli(["snapshot", "--milvus-uri", lite, "--collection", "docs", "--out", str(tmp_path / "b")], capsys)
    assert code == 0
    code, restored = run_cli(
        ["restore", "--milvus-uri", milvus_server, "--from", str(tmp_path / "b"), "--collection", "moved"], capsys
    )
    try:
        assert code == 0 and restored["rows"] == 600
        assert snapshot_rows(milvus_server, "moved") == snapshot_rows(lite, "docs")
        # Lite does not report HNSW build parameters: the identity's are used on the server.
        _, index = describe(milvus_server, "moved")
        assert index["index_type"] == "HNSW" and str(index.get("M")) == "16"
    finally:
        store = MilvusStore(milvus_server)
        store.drop_collection("moved")
        store.close()
