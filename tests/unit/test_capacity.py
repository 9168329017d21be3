"""The capacity planner's numbers, against examples computed by hand."""

import json

import pytest

from jobs.plan import main as plan_main
from reembed.capacity import (
    Throughput,
    compute_estimate,
    hnsw_graph_bytes_per_vector,
    memory_estimate,
    plan_capacity,
    vector_bytes,
)
from reembed.errors import ConfigError


def test_hnsw_graph_bytes_follow_hnswlib_layout():
    # M=32: layer 0 holds 64 links of 4 bytes + a 4-byte count = 260; label 8, pointer 8, level 4 = 20;
    # upper layers: (32 * 4 + 4) = 132 bytes, reached on average 1/31 times.
    assert hnsw_graph_bytes_per_vector(32) == pytest.approx(260 + 20 + 132 / 31)
    assert hnsw_graph_bytes_per_vector(16) == pytest.approx(132 + 20 + 68 / 15)  # 156.53


def test_vector_bytes_per_precision():
    assert vector_bytes(384, "float32") == 1536
    assert vector_bytes(384, "float16") == 768
    assert vector_bytes(384, "int8") == 384
    assert vector_bytes(384, "int8", int8_as_float=True) == 1536  # Milvus < 2.6: FLOAT_VECTOR
    assert vector_bytes(384, "binary+rerank") == 48 + 1024  # 384 bits + base64 of 768 float16 bytes
    with pytest.raises(ConfigError, match="precision"):
        vector_bytes(384, "int4")


def test_memory_estimate_by_hand():
    m = memory_estimate(1_000_000, 384, "int8", hnsw_m=16, text_bytes=0, replicas=2)
    assert m.vectors == 384e6
    assert m.graph == pytest.approx(156.5333e6, rel=1e-5)
    # id 16 + text 0 + hash 64 + partition 10 + row id/timestamp 16 + 4 varchar offsets of 4 bytes = 122
    assert m.scalars == 122e6
    assert m.total == pytest.approx(2 * (384e6 + 156.5333e6 + 122e6), rel=1e-6)


def test_compute_estimate_gpu_and_cpu():
    gpu = compute_estimate(1_000_000, 256, Throughput(100_000), workers=4, hour_usd=2.5)
    assert gpu.seconds == pytest.approx(640.0)  # 256e6 tokens / 400k tokens/s
    assert gpu.device_hours == pytest.approx(640 / 3600 * 4)
    assert gpu.cost_usd == pytest.approx(640 / 3600 * 4 * 2.5)
    cpu = Throughput.from_docs_per_s(50, 200, device="cpu", cores=2)  # 10k tokens/s on a 2-core machine
    est = compute_estimate(1_000_000, 200, cpu)
    assert est.seconds == pytest.approx(20_000) and est.device_hours == pytest.approx(20_000 / 3600 * 2)
    with pytest.raises(ConfigError, match="workers"):
        compute_estimate(1, 1, cpu, workers=0)


def test_plan_rows_scale_linearly():
    plan = plan_capacity((1_000_000, 10_000_000), 256, 384, Throughput(50_000))
    small, large = plan.rows
    assert large["compute"]["seconds"] == pytest.approx(10 * small["compute"]["seconds"])
    for p in ("float32", "float16", "int8", "binary+rerank"):
        assert large["memory"][p]["total"] == pytest.approx(10 * small["memory"][p]["total"])
    assert small["memory"]["int8"]["vectors"] < small["memory"]["float16"]["vectors"]


def test_cli_from_benchmark_and_bad_flags(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"planner": {"tokens_per_s": 5000, "tokens_per_doc": 200, "device_kind": "cpu"}}))
    assert plan_main(["--from-benchmark", str(bench), "--docs", "1M", "--cores", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["rows"][0]
    assert out["dimension"] == 384 and row["docs"] == 1_000_000
    assert row["compute"]["seconds"] == pytest.approx(200e6 / 5000)
    assert row["compute"]["device_hours"] == pytest.approx(200e6 / 5000 / 3600 * 2)
    # Two throughputs at once, or none, fail before any work.
    assert plan_main(["--tokens-per-s", "1", "--docs-per-s", "1", "--tokens-per-doc", "9"]) == 2
    assert "exactly one of" in capsys.readouterr().out
    assert plan_main(["--tokens-per-s", "1", "--docs", "ten"]) == 2
