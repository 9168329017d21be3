"""The job's per-batch steps called directly, as Ray would call them, against embedded Milvus Lite."""

import json
import os

import numpy as np
import pytest

from reembed.documents import (
    C_STATUS,
    C_TEXT,
    S_CHANGED,
    S_MOVED,
    S_NEW,
    S_REJECTED,
    S_UNCHANGED,
    DocumentSpec,
    normalize_json_lines,
    with_shard,
)
from reembed.embedder import describe_model
from reembed.ingest import (
    C_CLIPPED,
    C_PADDED,
    C_TOKENS,
    C_VECTOR,
    EMBED_STATUSES,
    BatchWriter,
    ChangeDetector,
    DocumentEncoder,
)
from reembed.quantize import fit_int8
from reembed.store import CollectionIdentity, MilvusStore


def as_batch(lines, spec, shard="s#0-1"):
    table = with_shard(normalize_json_lines(lines, ["f"] * len(lines), spec), shard)
    return {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}


def by_kind(summary, kind):
    return [
        (p, n, w)
        for k, p, n, w in zip(summary["kind"], summary["partition"], summary["count"], summary["written"], strict=True)
        if k == kind
    ]


@pytest.fixture(scope="module")
def minilm():
    return describe_model("all-MiniLM-L6-v2")


def make_collection(uri, ident, cal, partitioning):
    store = MilvusStore(uri)
    identity = CollectionIdentity(
        model=ident.to_dict(),
        precision="int8",
        vector_type="FLOAT_VECTOR",
        calibration=cal.to_json(),
        partitioning=partitioning,
        hnsw={"M": 16, "efConstruction": 64},
    )
    store.create_collection("c", identity, 1000)
    return store, identity


def test_encoder_then_writer_upserts_good_rows_and_reports_rejects(tmp_path, minilm):
    lines = [json.dumps({"_id": f"d{i}", "text": f"document number {i} about wings"}) for i in range(5)]
    lines.append(json.dumps({"_id": "bad"}))
    batch = as_batch(lines, DocumentSpec(partitions=2))
    source, ident = minilm

    floats = DocumentEncoder(source, "int8", None, device="cpu")(batch)[C_VECTOR]
    assert floats.dtype == np.float32 and not floats[5].any()  # calibration mode: floats, reject zeroed
    # Fitted on two documents at a low quantile, the scale clips values of the other three.
    cal = fit_int8(floats[:2], "global", quantile=0.9)
    out = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")(batch)
    assert out[C_VECTOR].dtype == np.int8 and np.array_equal(out[C_VECTOR][:5], cal.quantize(floats[:5]))
    clipped = cal.clipped_per_row(floats[:5])
    assert clipped.sum() > 0 and out[C_CLIPPED].tolist() == [*clipped.tolist(), 0]  # the reject clips nothing

    uri = str(tmp_path / "unit.db")
    store, identity = make_collection(uri, ident, cal, {"scheme": "hash", "partitions": 2})
    summary = BatchWriter(uri, None, "c", "FLOAT_VECTOR", 1000)(out)
    written = by_kind(summary, S_NEW)
    assert sum(w for _, _, w in written) == 5 and {p for p, _, _ in written} <= {"part_0000", "part_0001"}
    assert sum(summary["clipped"]) == clipped.sum()  # per (shard, status, partition), summed by the driver
    # Token counts: the reject computes nothing; each text is padded to its own 16-multiple.
    assert out[C_TOKENS][5] == 0 and out[C_PADDED][5] == 0
    assert (out[C_PADDED][:5] == 16).all() and (out[C_TOKENS][:5] < 16).all()
    assert sum(summary["tokens"]) == out[C_TOKENS].sum() and sum(summary["padded_tokens"]) == 80
    rejected = [r for k, r in zip(summary["kind"], summary["reason"], strict=True) if k == S_REJECTED]
    assert len(rejected) == 1 and rejected[0].startswith("missing text")
    assert set(summary["shard"]) == {"s#0-1"}
    assert store.count("c") == 5
    assert store.read_identity("c") == identity


def test_change_detector_skips_unchanged_and_rewrites_changed_and_moved(tmp_path, minilm):
    """Same text and partition: unchanged, never embedded; other text: changed; other partition:
    moved, rewritten, and the stale copy deleted so that the id is stored once."""
    source, ident = minilm
    spec = DocumentSpec(partition_by="lang")
    docs = [{"_id": f"d{i}", "text": f"page {i} on swept wings", "lang": "en"} for i in range(4)]
    first = as_batch([json.dumps(d) for d in docs], spec)
    encoder = DocumentEncoder(source, "float32", None, device="cpu")
    cal = fit_int8(encoder(first)[C_VECTOR], "global")
    uri = str(tmp_path / "detect.db")
    store, _ = make_collection(uri, ident, cal, {"scheme": "field", "field": "lang"})
    encoder = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")
    writer = BatchWriter(uri, None, "c", "FLOAT_VECTOR", 1000)
    writer(encoder(first))
    stored_before = {r["id"]: r["vector"] for r in store.query("c", 'id != ""', ["id", "vector"])}

    docs[1]["text"] = "page 1, rewritten: delta wings"
    docs[2]["lang"] = "fr"
    docs.append({"_id": "d9", "text": "a brand new page", "lang": "en"})
    second = as_batch([json.dumps(d) for d in docs], spec)
    detector = ChangeDetector(uri, None, "c")
    marked = detector(second)
    assert list(marked[C_STATUS]) == [S_UNCHANGED, S_CHANGED, S_MOVED, S_UNCHANGED, S_NEW]
    assert marked[C_TEXT][0] == "" and marked[C_TEXT][1]  # unchanged text is not carried on

    embedded = encoder(marked)
    assert not embedded[C_VECTOR][0].any() and embedded[C_VECTOR][1].any()  # the model skipped row 0
    summary = writer(embedded)
    assert sum(w for _, _, w in by_kind(summary, S_UNCHANGED)) == 0
    assert [(p, w) for p, _, w in by_kind(summary, S_MOVED)] == [("fr", 1)]
    rows = store.query("c", 'id != ""', ["id", "partition", "content_sha256", "vector"])
    assert sorted(r["id"] for r in rows) == ["d0", "d1", "d2", "d3", "d9"]  # d2 once, in "fr"
    assert {r["id"]: r["partition"] for r in rows}["d2"] == "fr"
    after = {r["id"]: r["vector"] for r in rows}
    assert np.array_equal(after["d0"], stored_before["d0"]) and not np.array_equal(after["d1"], stored_before["d1"])

    # A rerun of the same input finds nothing to do.
    assert set(ChangeDetector(uri, None, "c")(second)[C_STATUS]) == {S_UNCHANGED}
    # `--full` keeps the text and embeds unchanged rows too.
    full = ChangeDetector(uri, None, "c", keep_unchanged_text=True)(second)
    assert full[C_TEXT][0] and S_UNCHANGED not in EMBED_STATUSES


def test_bulk_stager_stages_parquet_and_reports_files_per_partition(tmp_path, minilm):
    """The stager returns the writer's summary (written = staged) plus one KIND_STAGED row per
    partition whose raw field lists the Parquet files; nothing reaches the collection itself."""
    from reembed.bulk import KIND_STAGED, BulkStager

    lines = [json.dumps({"_id": f"d{i}", "text": f"note {i} on boundary layers"}) for i in range(6)]
    lines.append(json.dumps({"_id": "bad"}))
    batch = as_batch(lines, DocumentSpec(partitions=2))
    source, ident = minilm
    floats = DocumentEncoder(source, "int8", None, device="cpu")(batch)[C_VECTOR]
    cal = fit_int8(floats[:6], "global")
    out = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")(batch)
    uri = str(tmp_path / "bulk.db")
    store, _ = make_collection(uri, ident, cal, {"scheme": "hash", "partitions": 2})
    (tmp_path / "staging").mkdir()  # the driver makes the run's staging folder
    summary = BulkStager(uri, None, "c", 1000, str(tmp_path / "staging"))(out)
    assert sum(w for _, _, w in by_kind(summary, S_NEW)) == 6
    staged = {
        p: json.loads(raw)
        for k, p, raw in zip(summary["kind"], summary["partition"], summary["raw"], strict=True)
        if k == KIND_STAGED
    }
    assert set(staged) <= {"part_0000", "part_0001"} and all(staged.values())
    assert all(f.endswith(".parquet") and os.path.exists(f) for files in staged.values() for f in files)
    assert len({len(v) for v in summary.values()}) == 1  # every column has a value for every row
    assert store.count("c") == 0
