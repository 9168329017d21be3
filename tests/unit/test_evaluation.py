"""The evaluation's pure parts: memory accounting, in-memory rankings per mode, overlap, report, plot."""

from pathlib import Path

import numpy as np
import pytest

from reembed.config import EvaluateConfig, load_settings
from reembed.errors import ConfigError
from reembed.evaluation import (
    bytes_per_vector,
    format_report,
    hnsw_memory_estimate,
    hnsw_params,
    in_memory_rankings,
    plot_sweep,
    top_k_overlap,
)
from reembed.metrics import exact_search
from reembed.quantize import fit_int8


def test_bytes_per_vector_counts_codes_and_rerank_copies():
    # d = 384: float32 4 * 384 = 1536; int8 384; binary 384 / 8 = 48; float16 copies as base64: 1024
    assert bytes_per_vector("float32", 384, "FLOAT_VECTOR") == {
        "bytes_per_vector": 1536,
        "code_bytes_per_vector": 1536,
        "rerank_bytes_per_vector": 0,
        "stored_bytes_per_vector": 1536,
    }
    int8_old_server = bytes_per_vector("int8", 384, "FLOAT_VECTOR")
    assert int8_old_server["bytes_per_vector"] == 384 == 1536 // 4
    assert int8_old_server["stored_bytes_per_vector"] == 1536  # codes in a FLOAT_VECTOR field
    assert bytes_per_vector("int8", 384, "INT8_VECTOR")["stored_bytes_per_vector"] == 384
    binary = bytes_per_vector("binary+rerank", 384, "BINARY_VECTOR")
    assert binary["code_bytes_per_vector"] == 48 == 1536 // 32
    assert binary["rerank_bytes_per_vector"] == 1024 and binary["bytes_per_vector"] == binary["stored_bytes_per_vector"]
    assert binary["bytes_per_vector"] == 1072
    assert bytes_per_vector("int8+rerank", 384, "FLOAT_VECTOR")["stored_bytes_per_vector"] == 1536 + 1024


def test_top_k_overlap_is_ann_recall_against_the_reference():
    # q1: 2 of the reference's 2 -> 1; q2: 1 of 2 -> 0.5; q3 missing from the run -> 0; mean 0.5
    reference = {"q1": ["a", "b"], "q2": ["c", "d"], "q3": ["e", "f"]}
    run = {"q1": ["b", "a"], "q2": ["c", "x"]}
    assert top_k_overlap(run, reference, 2) == pytest.approx(0.5)


def test_hnsw_memory_estimate_by_hand():
    # n=1000, d=4, M=8: level 0 = 1000 * (16 + 64 + 4 + 8) = 92,000; upper = 125 * (32 + 4) = 4,500
    assert hnsw_memory_estimate(1000, 4, 8) == 96_500


def test_hnsw_params_nested_or_flat():
    assert hnsw_params({"params": {"M": 16, "efConstruction": 64}}) == {"M": 16, "efConstruction": 64}
    assert hnsw_params({"params": '{"M": "8", "efConstruction": "32"}'}) == {"M": 8, "efConstruction": 32}
    assert hnsw_params({"M": "32", "efConstruction": "200"}) == {"M": 32, "efConstruction": 200}
    assert hnsw_params({"index_type": "BIN_FLAT"}) == {"M": None, "efConstruction": None}


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_in_memory_rankings_with_every_candidate_rescored_equal_exact_on_the_copies():
    docs, queries = unit_rows(60, 32, 1), unit_rows(7, 32, 2)
    cal = fit_int8(docs, "global", 1.0)
    ranked = in_memory_rankings(queries, docs, cal, rescore_multiplier=20, k=5)  # 5 * 20 >= 60 documents
    copies = docs.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ranked["float32"], exact_search(queries, docs, 5))
    np.testing.assert_array_equal(ranked["int8"], exact_search(cal.quantize(queries), cal.quantize(docs), 5))
    # every document is a candidate, so re-ranking alone decides: exact search on the float16 copies
    np.testing.assert_array_equal(ranked["binary+rerank"], exact_search(queries, copies, 5))
    np.testing.assert_array_equal(ranked["int8+rerank"], exact_search(queries, copies, 5))
    assert set(in_memory_rankings(queries, docs, cal, 2, 5, modes=["int8"])) == {"int8"}


def sample_report(binary_refused: bool) -> dict:
    row = {
        "ndcg@10": 0.4,
        "recall@10": 0.41,
        "recall@100": 0.77,
        "mrr@10": 0.53,
        "ndcg@10_ratio_to_float32": 1.0,
        "code_bytes_per_vector": 48,
        "rerank_bytes_per_vector": 1024,
        "stored_bytes_per_vector": 1072,
        "search_ms_p50": 1.5,
        "top10_overlap_with_exact": 0.98,
    }
    results = {"float32": row, "int8": row, "int8+rerank": row}
    results["binary+rerank"] = {"refused": "no BINARY_VECTOR here"} if binary_refused else row
    return {
        "data": {"name": "cranfield", "documents": 1398, "queries": 225},
        "model": {"name": "m", "dimension": 384},
        "milvus": {"version": "v2.3.5"},
        "search": {"ef": 64, "rescore_multiplier": 10},
        "exact": {"ndcg@10": 0.4, "recall@10": 0.41, "recall@100": 0.77, "mrr@10": 0.53},
        "results": results,
        "calibration": {
            "sample_size": 1024,
            "quantile": 0.9999,
            "sample_clipped_fraction": 1e-4,
            "queries_clipped_fraction": 0.0,
            "after_calibration": {"documents": 374, "clipped_fraction": 2e-4, "drift_threshold": 1e-3, "drift": False},
        },
        "targets": {"t": {"name": "gap", "value": 0.001, "want": "<= 0.005", "met": True}},
        "hnsw_sweep": [
            {
                "M": 16,
                "efConstruction": 64,
                "ef": 10,
                "ann_recall@10": 0.97,
                "search_ms_p50": 1.2,
                "search_ms_p95": 2.0,
                "build_s": 1.1,
                "load_s": 0.5,
                "memory_bytes": None,
                "memory_bytes_estimate": 2 << 20,
            }
        ],
    }


def test_format_report_lists_every_mode_and_says_why_one_was_refused():
    text = format_report(sample_report(binary_refused=True))
    assert "cranfield: 1398 documents, 225 judged queries" in text
    assert "binary+rerank: refused: no BINARY_VECTOR here" in text
    assert "48+1024" in text and "target gap: 0.0010 (want <= 0.005): met" in text
    assert "no drift" in text and "HNSW sweep" in text and "0.9700" in text


def test_plot_sweep_writes_a_png(tmp_path):
    points = [
        {"M": m, "efConstruction": 64, "ef": ef, "ann_recall@10": r, "search_ms_p50": t}
        for m, ef, r, t in [(8, 10, 0.9, 1.0), (8, 64, 0.99, 2.0), (16, 10, 0.95, 1.1), (16, 64, 1.0, 2.2)]
    ]
    path = tmp_path / "sweep.png"
    plot_sweep(points, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def beir_dir(tmp_path: Path) -> Path:
    (tmp_path / "qrels").mkdir()
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (tmp_path / name).write_text("")
    return tmp_path


def test_evaluate_config_parses_sweep_lists_and_checks_the_folder(tmp_path):
    cfg = load_settings(
        EvaluateConfig, {"beir": str(beir_dir(tmp_path)), "json_out": "r.json", "sweep_m": "8,16", "sweep_ef": "10"}
    )
    assert cfg.sweep_m == [8, 16] and cfg.sweep_ef == [10] and cfg.rescore_multiplier == 10
    with pytest.raises(ConfigError, match=r"beir: expected a BEIR folder holding qrels/dev.tsv"):
        load_settings(EvaluateConfig, {"beir": str(tmp_path), "json_out": "r.json", "split": "dev"})
    with pytest.raises(ConfigError, match="sweep_m: expected HNSW M values in 4..64"):
        load_settings(EvaluateConfig, {"beir": str(tmp_path), "json_out": "r.json", "sweep_m": "2"})
    with pytest.raises(ConfigError, match="rescore_multiplier"):
        load_settings(EvaluateConfig, {"beir": str(tmp_path), "json_out": "r.json", "rescore_multiplier": 200})
    with pytest.raises(ConfigError, match="collection_prefix"):
        load_settings(EvaluateConfig, {"beir": str(tmp_path), "json_out": "r.json", "collection_prefix": "9x"})
