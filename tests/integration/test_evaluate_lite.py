"""jobs.evaluate end to end on a slice of Cranfield: the real job, Milvus Lite, MiniLM, exact search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.evaluate import main
from reembed.evaluation import MODES
from tests.conftest import read_jsonl, write_jsonl

pytestmark = pytest.mark.integration

N_DOCS = 160


def cranfield_slice(cranfield: Path, root: Path, n_docs: int = N_DOCS) -> Path:
    """The first n_docs documents, with the queries that have a judged document among them."""
    docs = read_jsonl(cranfield / "corpus.jsonl")[:n_docs]
    kept = {d["_id"] for d in docs}
    lines = (cranfield / "qrels" / "test.tsv").read_text().splitlines()
    qrels = [line for line in lines[1:] if line.split("\t")[1] in kept and int(line.split("\t")[2]) > 0]
    qids = {line.split("\t")[0] for line in qrels}
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(root / "queries.jsonl", [q for q in read_jsonl(cranfield / "queries.jsonl") if q["_id"] in qids])
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("\n".join([lines[0], *qrels]) + "\n")
    return root


def test_evaluation_on_milvus_lite(tmp_path, cranfield, ray_local, capsys):
    beir = cranfield_slice(cranfield, tmp_path / "beir")
    argv = [
        "--beir", str(beir),
        "--json", str(tmp_path / "out" / "report.json"),
        "--milvus-uri", str(tmp_path / "eval.db"),
        "--output-dir", str(tmp_path / "runs"),
        "--calibration-sample", "64",
        "--device", "cpu",
        "--sweep-m", "8",
        "--sweep-ef-construction", "32",
        "--sweep-ef", "10,64",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert "binary+rerank: refused" in out.err and "exact (in memory)" in out.err  # the readable table

    # Cranfield documents 1..160 hold no empty ones: all written by the job, embedded once.
    assert report["backfill"]["written"] == N_DOCS == report["data"]["documents"]
    assert report["milvus"]["lite"] is True
    assert set(report["results"]) == set(MODES)
    binary = report["results"]["binary+rerank"]
    assert set(binary) == {"refused"} and "BINARY_VECTOR" in binary["refused"] and "not emulated" in binary["refused"]
    assert report["targets"]["binary_rerank_ratio"]["met"] is None

    exact = report["exact"]
    assert exact["ndcg@10"] > 0.2  # MiniLM finds Cranfield's judged documents
    for name in ("float32", "int8", "int8+rerank"):
        row = report["results"][name]
        for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10", "bytes_per_vector", "search_ms_p50"):
            assert key in row, (name, key)
        assert 0 < row["search_ms_p50"] < 1000 and 0 <= row["ndcg@10"] <= 1
    f32 = report["results"]["float32"]
    # 160 documents: HNSW finds the exact top 10, so Milvus float32 ranks as exact search does.
    assert f32["top10_overlap_with_exact"] >= 0.98
    assert abs(f32["ndcg@10"] - exact["ndcg@10"]) <= 0.005 and report["targets"]["float32_vs_exact"]["met"]
    assert f32["in_memory"]["ndcg@10"] == exact["ndcg@10"]
    assert f32["index"] == {"index_type": "HNSW", "metric_type": "IP", "M": 32, "efConstruction": 200}
    int8 = report["results"]["int8"]
    assert int8["bytes_per_vector"] * 4 == f32["bytes_per_vector"] == 1536
    assert int8["stored_bytes_per_vector"] == 1536  # Lite stores the codes in a FLOAT_VECTOR field
    assert int8["ndcg@10_ratio_to_float32"] >= 0.95
    rerank = report["results"]["int8+rerank"]
    assert rerank["rerank_bytes_per_vector"] == 1024 and rerank["bytes_per_vector"] == 384 + 1024
    # Milvus and the in-memory ranking of the same encoding agree.
    assert abs(rerank["ndcg@10"] - rerank["in_memory"]["ndcg@10"]) <= 0.01

    cal = report["calibration"]
    assert cal["sample_size"] == 64 and cal["after_calibration"]["documents"] == N_DOCS - 64
    assert 0 <= cal["after_calibration"]["clipped_fraction"] < 0.01

    sweep = report["hnsw_sweep"]
    assert [(p["M"], p["efConstruction"], p["ef"]) for p in sweep] == [(8, 32, 10), (8, 32, 64)]
    assert all(0.5 <= p["ann_recall@10"] <= 1 and p["build_s"] >= 0 for p in sweep)
    assert Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"
