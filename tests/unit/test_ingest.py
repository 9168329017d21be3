"""The job's per-batch steps called directly, as Ray would call them, against embedded Milvus Lite."""

import json

import numpy as np

from reembed.documents import DocumentSpec, normalize_json_lines
from reembed.embedder import describe_model
from reembed.ingest import C_CLIPPED, C_VECTOR, BatchWriter, DocumentEncoder
from reembed.quantize import fit_int8
from reembed.store import CollectionIdentity, MilvusStore


def test_encoder_then_writer_upserts_good_rows_and_reports_rejects(tmp_path):
    lines = [json.dumps({"_id": f"d{i}", "text": f"document number {i} about wings"}) for i in range(5)]
    lines.append(json.dumps({"_id": "bad"}))
    batch = {
        k: np.array(v, dtype=object)
        for k, v in normalize_json_lines(lines, ["f"] * 6, DocumentSpec(partitions=2)).to_pydict().items()
    }
    source, ident = describe_model("all-MiniLM-L6-v2")

    floats = DocumentEncoder(source, "int8", None, device="cpu")(batch)[C_VECTOR]
    assert floats.dtype == np.float32 and not floats[5].any()  # calibration mode: floats, reject zeroed
    # Fitted on two documents at a low quantile, the scale clips values of the other three.
    cal = fit_int8(floats[:2], "global", quantile=0.9)
    out = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")(batch)
    assert out[C_VECTOR].dtype == np.int8 and np.array_equal(out[C_VECTOR][:5], cal.quantize(floats[:5]))
    clipped = cal.clipped_per_row(floats[:5])
    assert clipped.sum() > 0 and out[C_CLIPPED].tolist() == [*clipped.tolist(), 0]  # the reject clips nothing

    uri = str(tmp_path / "unit.db")
    store = MilvusStore(uri)
    identity = CollectionIdentity(
        model=ident.to_dict(),
        precision="int8",
        vector_type="FLOAT_VECTOR",
        calibration=cal.to_json(),
        partitioning={"scheme": "hash", "partitions": 2},
        hnsw={"M": 16, "efConstruction": 64},
    )
    store.create_collection("c", identity, 1000)
    summary = BatchWriter(uri, None, "c", "FLOAT_VECTOR", 1000, False)(out)
    written = {
        p: n for k, p, n in zip(summary["kind"], summary["partition"], summary["count"], strict=True) if k == "written"
    }
    assert sum(written.values()) == 5 and set(written) <= {"part_0000", "part_0001"}
    assert sum(summary["clipped"]) == clipped.sum()  # per partition, summed by the driver
    rejected = [r for k, r in zip(summary["kind"], summary["reason"], strict=True) if k == "rejected"]
    assert len(rejected) == 1 and rejected[0].startswith("missing text")
    assert store.count("c") == 5
    assert store.read_identity("c") == identity
