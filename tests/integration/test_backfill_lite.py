"""The backfill job end to end on the embedded default: real Ray, Milvus Lite, all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.backfill import parse_config, run
from reembed.errors import ConfigError, ModelMismatchError, StoreUnavailableError
from reembed.search import Searcher
from reembed.store import F_ID, MilvusStore
from tests.conftest import REPO, cranfield_docs, open_store, read_jsonl, write_jsonl

pytestmark = pytest.mark.integration


def backfill_argv(tmp_path: Path, input_path: Path, collection: str = "docs", db: str = "m.db", **flags) -> list:
    argv = [
        "--input",
        str(input_path),
        "--milvus-uri",
        flags.pop("milvus_uri", str(tmp_path / db)),
        "--collection",
        collection,
        "--output-dir",
        str(tmp_path / "runs"),
        "--calibration-sample",
        "128",
    ]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def backfill(tmp_path: Path, input_path: Path, collection: str = "docs", db: str = "m.db", **flags):
    return run(parse_config(backfill_argv(tmp_path, input_path, collection, db, **flags)))


def all_ids(db: str, collection: str) -> list[str]:
    with open_store(db) as store:
        rows = store.query(collection, f'{F_ID} != ""', [F_ID], limit=16384)
    return [r[F_ID] for r in rows]


@pytest.fixture(scope="module")
def cranfield_backfill(tmp_path_factory, cranfield, ray_local):
    tmp = tmp_path_factory.mktemp("cran")
    summary = backfill(tmp, cranfield / "corpus.jsonl", collection="cranfield", batch_size=32)
    return tmp, summary


def test_cranfield_backfill_finds_relevant_documents(cranfield_backfill, cranfield):
    tmp, summary = cranfield_backfill
    # Two Cranfield documents (471, 995) have neither title nor text: rejected with a reason.
    assert summary["read"] == 1400 and summary["written"] == 1398 and summary["rejected"] == 2
    rejects = read_jsonl(Path(summary["rejects_file"]))
    assert sorted(r["id"] for r in rejects) == ["471", "995"]
    assert all(r["reason"].startswith("missing text") for r in rejects)
    assert summary["precision"] == "int8" and summary["vector_type"] == "FLOAT_VECTOR"
    # Fitted on 128 documents: the other 1,270 are checked against the scale, and fit it.
    clipping = summary["int8_clipping"]
    assert clipping["documents"] == 1398 - 128 and clipping["values"] == 1270 * 384
    assert clipping["clipped_fraction"] < 1e-3 and summary["int8_drift"] is False
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert manifest["summary"]["partitions"] == {"_default": 1398}
    assert manifest["config"]["collection"] == "cranfield"

    queries = {q["_id"]: q["text"] for q in read_jsonl(cranfield / "queries.jsonl")}
    qrels: dict[str, set[str]] = {}
    for line in (cranfield / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(qid, set()).add(did)
    with open_store(str(tmp / "m.db")) as store:
        searcher = Searcher(store, "cranfield", device="cpu")
        judged = [q for q in queries if q in qrels]
        hits, timing = searcher.search([queries[q] for q in judged], k=10, ef=128)
    found = sum(bool({h.id for h in row} & qrels[q]) for q, row in zip(judged, hits, strict=True))
    assert timing["embed"] > 0 and timing["search"] > 0
    # all-MiniLM-L6-v2 finds a judged document in the top 10 for most Cranfield queries.
    assert found / len(judged) >= 0.7, f"only {found}/{len(judged)} queries found a relevant document"
    assert 0.0 < hits[0][0].score <= 1.05  # int8 code scores are mapped back to cosine


def test_rerun_is_idempotent_and_cli_prints_summary(tmp_path, cranfield, ray_local):
    docs = cranfield_docs(cranfield, 60)
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    first = backfill(tmp_path, src, partitions=3)
    assert first["written"] == 60
    # The same input again, through the CLI as a user runs it: same rows, no duplicates.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.backfill",
            "--input",
            str(src),
            "--milvus-uri",
            str(tmp_path / "m.db"),
            "--collection",
            "docs",
            "--output-dir",
            str(tmp_path / "runs"),
            "--partitions",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("read", "written", "rejected", "docs_per_s", "seconds", "collection", "model", "precision"):
        assert key in summary
    # Nothing changed: every shard of the first run is skipped unread, nothing is written.
    assert summary["read"] == 0 and summary["written"] == 0 and summary["calibration"] == "reused"
    # The CLI started a local Ray of its own; the first run joined the test's.
    assert summary["ray_start_seconds"] > 0 and first["ray_start_seconds"] < 0.5
    assert summary["shards"]["skipped"] == summary["shards"]["total"] == first["shards"]["total"]
    assert set(first["partitions"]) == {"part_0000", "part_0001", "part_0002"}
    ids = all_ids(str(tmp_path / "m.db"), "docs")
    assert sorted(ids) == sorted(d["_id"] for d in docs)


def test_documents_the_calibration_does_not_fit_are_flagged_as_drift(tmp_path, cranfield, ray_local):
    # The scale is fitted on 16 copies of one short text, whose largest component (0.134) is below
    # what most Cranfield abstracts reach (median 0.168): later abstracts clip ~1 % of their values,
    # ten times the threshold of max(10 * (1 - 0.9999), 0.1 %) = 0.1 %.
    narrow = [{"_id": f"n{i}", "text": "boundary layer flow over a flat plate at supersonic speed"} for i in range(16)]
    first = backfill(tmp_path, write_jsonl(tmp_path / "narrow.jsonl", narrow), calibration_sample=16)
    assert first["int8_clipping"]["documents"] == 0 and first["int8_drift"] is False
    later = write_jsonl(tmp_path / "later.jsonl", read_jsonl(cranfield / "corpus.jsonl")[:40])
    second = backfill(tmp_path, later)
    assert second["calibration"] == "reused" and second["written"] == 40
    clipping = second["int8_clipping"]
    assert clipping["documents"] == 40 and clipping["calibration_sample_size"] == 16
    assert clipping["clipped_fraction"] > 3e-3 and clipping["drift"] is True and second["int8_drift"] is True


def test_bad_rows_are_counted_and_kept_with_reasons(tmp_path, cranfield, ray_local):
    good = cranfield_docs(cranfield, 20)
    bad = [
        {"title": "no id here", "text": "some text"},
        {"_id": "empty", "title": "", "text": "   "},
        {"_id": "number", "text": 42},
        {"_id": "dup", "text": "first copy"},
        {"_id": "dup", "text": "second copy"},
        "{not json",
        json.dumps([1, 2, 3]),
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", good[:10] + bad + good[10:])
    summary = backfill(tmp_path, src)
    assert summary["written"] == 20
    assert summary["rejected"] == 7 and summary["read"] == 27
    rejects = read_jsonl(Path(summary["rejects_file"]))
    counts = {}
    for r in rejects:
        counts[r["reason"].split(":")[0]] = counts.get(r["reason"].split(":")[0], 0) + 1
    assert counts == {
        "missing id": 1,
        "missing text": 1,
        "bad text": 1,
        "duplicate id": 2,
        "bad JSON": 1,
        "bad record": 1,
    }
    assert summary["rejected_by_reason"] == counts
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"].split(":")[0], []).append(r)
    assert len(by_reason["missing id"]) == 1
    assert len(by_reason["missing text"]) == 1 and by_reason["missing text"][0]["id"] == "empty"
    assert len(by_reason["bad text"]) == 1 and "int" in by_reason["bad text"][0]["reason"]
    assert sorted(json.loads(r["raw"])["text"] for r in by_reason["duplicate id"]) == ["first copy", "second copy"]
    assert by_reason["bad JSON"][0]["raw"] == "{not json"
    assert len(by_reason["bad record"]) == 1
    assert all(r["source"].endswith("bad.jsonl") for r in rejects)
    assert sorted(all_ids(str(tmp_path / "m.db"), "docs")) == sorted(d["_id"] for d in good)


def test_partition_by_field_uses_valid_names(tmp_path, cranfield, ray_local):
    docs = cranfield_docs(cranfield, 12)
    for i, d in enumerate(docs):
        d["lang"] = ["en", "en-US", "fr"][i % 3]
    src = write_jsonl(tmp_path / "p.jsonl", docs)
    summary = backfill(tmp_path, src, partition_by="lang")
    assert summary["written"] == 12
    names = set(summary["partitions"])
    assert "en" in names and "fr" in names and len(names) == 3
    odd = (names - {"en", "fr"}).pop()
    assert odd.startswith("p_en_US_")
    store = MilvusStore(str(tmp_path / "m.db"))
    try:
        assert store.count("docs", odd) == 4
    finally:
        store.close()


def test_other_model_on_same_collection_is_refused(cranfield_backfill, cranfield, tiny_model):
    tmp, first = cranfield_backfill  # the MiniLM int8 collection; refused runs change nothing in it
    src = write_jsonl(tmp / "other" / "a.jsonl", cranfield_docs(cranfield, 8))
    with pytest.raises(ModelMismatchError) as err:
        backfill(tmp, src, collection="cranfield", model=str(tiny_model))
    assert "model.dimension: collection has 384, this run has 32" in str(err.value)
    with pytest.raises(ModelMismatchError) as err:
        backfill(tmp, src, collection="cranfield", precision="float32")
    assert "precision" in str(err.value)
    assert len(all_ids(str(tmp / "m.db"), "cranfield")) == first["written"]


def test_bad_config_fails_before_any_work(tmp_path, cranfield):
    src = write_jsonl(tmp_path / "a.jsonl", cranfield_docs(cranfield, 3))
    with pytest.raises(ConfigError, match="does not exist"):
        backfill(tmp_path, tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="id_field: 'doc_id'"):
        backfill(tmp_path, src, id_field="doc_id")
    with pytest.raises(ConfigError, match="text_fields"):
        backfill(tmp_path, src, text_fields="body,abstract")
    with pytest.raises(ConfigError, match="partitions"):
        backfill(tmp_path, src, partitions=0)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="cannot read Parquet"):
        backfill(tmp_path, tmp_path / "broken.parquet")
    argv = ["--input", str(src), "--milvus-uri", "http://127.0.0.1:9", "--output-dir", str(tmp_path / "runs")]
    with pytest.raises(StoreUnavailableError, match="cannot reach Milvus"):
        run(parse_config(argv))
    assert not (tmp_path / "runs").exists()  # nothing was started, so no run directory


def test_directory_of_jsonl_and_parquet_through_a_filesystem_uri(tmp_path, cranfield, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = cranfield_docs(cranfield, 16)
    folder = tmp_path / "mixed"
    write_jsonl(folder / "part-a.jsonl", docs[:8])
    rows = [{"_id": d["_id"], "title": d["title"], "text": d["text"]} for d in docs[8:]]
    rows.append({"_id": "no-text", "title": None, "text": None})
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-b.parquet")
    summary = backfill(tmp_path, f"file://{folder}")
    assert summary["written"] == 16 and summary["rejected"] == 1
    reject = read_jsonl(Path(summary["rejects_file"]))[0]
    assert reject["id"] == "no-text" and reject["source"].endswith("part-b.parquet")
    assert sorted(all_ids(str(tmp_path / "m.db"), "docs")) == sorted(d["_id"] for d in docs)


def test_the_census_is_the_same_in_the_driver_and_by_a_shuffle(tmp_path, ray_local, monkeypatch):
    """Small inputs are counted in the driver, large ones by Ray Data tasks and a shuffle: same answer."""
    from jobs import pipeline
    from reembed.documents import DocumentSpec
    from reembed.inputs import inspect_input
    from reembed.shards import plan_shards

    docs = [{"_id": f"d{i % 7}" if i % 3 == 0 else f"u{i}", "text": f"text {i}"} for i in range(60)]
    src = write_jsonl(tmp_path / "dup.jsonl", [*docs, {"_id": "no-text"}, "{not json"])
    plan = inspect_input(str(src), "_id", ["title", "text"], None)
    shards, _ = plan_shards(plan, 256)  # several shards, several blocks
    spec = DocumentSpec()
    driver = pipeline.take_census(shards, plan.filesystem, spec, plan.total_bytes)
    monkeypatch.setattr(pipeline, "DRIVER_ID_COUNT_BYTES", -1)
    shuffled = pipeline.take_census(shards, plan.filesystem, spec, plan.total_bytes)
    expected = {f"d{k}": sum(1 for i in range(0, 60, 3) if i % 7 == k) for k in range(7)}
    repeated = {k: n for k, n in expected.items() if n > 1}
    assert driver.duplicates == shuffled.duplicates == repeated
    assert driver.summary() == shuffled.summary()
    assert driver.rows == 62 and driver.good == 60 and driver.complete
    assert driver.documents == 60 - sum(repeated.values())
    assert driver.ids == {d["_id"] for d in docs} | {"no-text"}
    assert {r["id"] for r in pipeline.input_ids(shuffled.id_rows).take_all()} == driver.ids
