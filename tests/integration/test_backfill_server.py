"""The backfill against the real Milvus C++ server (2.3.5 from the `milvus` package), several writers."""

from __future__ import annotations

import threading
import time

import pytest

from reembed.search import Searcher
from reembed.store import F_ID, F_PARTITION, MilvusStore
from tests.conftest import cranfield_docs, write_jsonl
from tests.integration.test_backfill_lite import backfill_argv
from tests.integration.test_incremental import assert_collection_is, backfill, good_docs, wait_for_record

pytestmark = [pytest.mark.integration, pytest.mark.milvus_server]


def test_backfill_into_milvus_server_with_concurrent_writers(tmp_path, cranfield, ray_local, milvus_server):
    from jobs.backfill import parse_config, run

    docs = cranfield_docs(cranfield, 150)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    argv = backfill_argv(
        tmp_path, src, collection="server_docs", milvus_uri=milvus_server, partitions=3, writers=3, write_batch_rows=32
    )
    first = run(parse_config(argv))
    assert first["milvus"].startswith("v2.3") and first["vector_type"] == "FLOAT_VECTOR"
    assert first["written"] == 150 and first["rejected"] == 0
    again = run(parse_config(argv))  # nothing changed: every shard is skipped
    assert (again["read"], again["written"], again["shards"]["skipped"]) == (0, 0, first["shards"]["total"])
    second = run(parse_config([*argv, "--full"]))  # everything re-embedded: upserts by id leave the same rows
    assert second["written"] == second["unchanged"] == first["written"] and second["calibration"] == "reused"

    store = MilvusStore(milvus_server)
    try:
        rows = store.query("server_docs", f'{F_ID} != ""', [F_ID, F_PARTITION], limit=16384)
        ids = [r[F_ID] for r in rows]
        assert len(ids) == len(set(ids)) == first["written"]
        assert {r[F_PARTITION] for r in rows} == {"part_0000", "part_0001", "part_0002"}
        searcher = Searcher(store, "server_docs", device="cpu")
        hits, timing = searcher.search([docs[5]["title"]], k=5, ef=64)
        assert hits[0][0].id == docs[5]["_id"]
        assert timing["search"] > 0
    finally:
        store.close()


def test_document_that_changes_partition_is_not_kept_twice(tmp_path, cranfield, ray_local, milvus_server):
    """On a real server an upsert replaces a row only within its partition: the job deletes the old copy."""
    from jobs.backfill import parse_config, run

    docs = cranfield_docs(cranfield, 6)
    for i, d in enumerate(docs):
        d["year"] = "y1960" if i % 2 else "y1961"
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    argv = backfill_argv(tmp_path, src, collection="moves", milvus_uri=milvus_server, partition_by="year")
    run(parse_config(argv))
    docs[0]["year"] = "y1960"  # document 1 moves from y1961 to y1960
    write_jsonl(src, docs)
    run(parse_config(argv))
    store = MilvusStore(milvus_server)
    try:
        rows = store.query("moves", f'{F_ID} != ""', [F_ID, F_PARTITION], limit=100)
        assert sorted(r[F_ID] for r in rows) == sorted(d["_id"] for d in docs)
        assert {r[F_PARTITION] for r in rows if r[F_ID] == docs[0]["_id"]} == {"y1960"}
    finally:
        store.close()


def test_milvus_restarted_in_the_middle_of_writes_loses_nothing(tmp_path, cranfield, ray_local, milvus_server_process):
    """kill -9 of the server while several writers upsert, restart on the same data: retried writes,
    every document once, and the shards recorded before the crash are really there."""
    docs = good_docs(cranfield, 240)
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    uri = milvus_server_process.uri
    result: dict = {}
    job = threading.Thread(
        target=lambda: result.update(backfill(tmp_path, src, "--writers", "3", uri=uri, collection="restart"))
    )
    job.start()
    wait_for_record(tmp_path / "runs" / "restart" / "shards.jsonl", job.is_alive)
    milvus_server_process.kill()
    time.sleep(2)
    milvus_server_process.start()
    job.join(timeout=900)
    assert result, "the job did not finish after the Milvus restart"
    assert result["written"] == len(docs) and result["rejected"] == 0
    assert_collection_is(uri, docs, "restart")


@pytest.mark.slow  # a minute here; the incremental logic itself is in test_incremental.py on every run
def test_search_keeps_answering_while_an_incremental_run_writes(tmp_path, cranfield, ray_local, milvus_server):
    docs = good_docs(cranfield, 120)
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    backfill(tmp_path, src, uri=milvus_server, collection="incr_live")
    store = MilvusStore(milvus_server)
    searcher = Searcher(store, "incr_live", device="cpu")
    edited = [dict(d, text=d["text"] + " (second edition)") if i % 4 == 0 else d for i, d in enumerate(docs)]
    edited += [{"_id": f"extra-{i}", "title": "", "text": f"supplementary note {i} on jet noise"} for i in range(20)]
    write_jsonl(src, edited)
    stop, answers, errors = threading.Event(), [], []

    def search_loop() -> None:
        while not stop.is_set():
            try:
                hits, _ = searcher.search([docs[7]["title"]], k=5, ef=64)
                answers.append(hits[0][0].id)
            except Exception as exc:  # every failure is a finding
                errors.append(repr(exc))

    reader = threading.Thread(target=search_loop)
    reader.start()
    try:
        summary = backfill(tmp_path, src, uri=milvus_server, collection="incr_live")
    finally:
        stop.set()
        reader.join(timeout=60)
        store.close()
    assert (summary["new"], summary["changed"], summary["unchanged"]) == (20, 30, 90)
    assert errors == [] and len(answers) >= 5
    assert set(answers) == {docs[7]["_id"]}
    assert_collection_is(milvus_server, edited, "incr_live")
