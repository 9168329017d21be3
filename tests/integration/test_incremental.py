"""Incremental and crash-safe ingestion on the embedded default (real Ray, Milvus Lite, MiniLM).

Each test checks the collection against the input itself: exactly the input's ids, each once,
each with the content hash of its current text and with the int8 codes that an uninterrupted
run gives (computed here, in the test, with the same model and the collection's calibration).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.backfill import parse_config, run
from reembed.documents import C_ID, C_STATUS, S_NEW, DocumentSpec, content_hash, normalize_json_lines
from reembed.embedder import resolve_model
from reembed.errors import InputDataError
from reembed.ingest import C_VECTOR, DocumentEncoder
from reembed.store import F_HASH, F_ID, F_VECTOR
from tests.conftest import REPO, SHORT_TEXT_WORDS, cranfield_docs, open_store, write_jsonl
from tests.unit.test_shards import corrupt_row_group

pytestmark = pytest.mark.integration
KILL_WAIT_S = 300


def job_argv(tmp: Path, input_path: Path, *extra: str, uri: str | None = None, collection: str = "docs") -> list[str]:
    return [
        "--input",
        str(input_path),
        "--milvus-uri",
        uri or str(tmp / "m.db"),
        "--collection",
        collection,
        "--output-dir",
        str(tmp / "runs"),
        "--calibration-sample",
        "64",
        "--shard-bytes",
        "8192",
        "--checkpoint-interval-s",
        "0.2",
        *extra,
    ]


def backfill(tmp: Path, input_path: Path, *extra: str, uri: str | None = None, collection: str = "docs") -> dict:
    return run(parse_config(job_argv(tmp, input_path, *extra, uri=uri, collection=collection)))


def good_docs(cranfield: Path, n: int, words: int | None = SHORT_TEXT_WORDS) -> list[dict]:
    """The first n Cranfield documents that have text, cut short unless words=None (see tests/conftest.py)."""
    return [d for d in cranfield_docs(cranfield, n + 8, words) if (d.get("title") or d.get("text", "")).strip()][:n]


def doc_text(doc: dict) -> str:
    return " ".join(v.strip() for v in (doc.get("title"), doc.get("text")) if v and v.strip())


def assert_collection_is(uri: str, docs: list[dict], collection: str = "docs") -> None:
    """Exactly these documents, once each, with their current hashes and uninterrupted-run codes."""
    with open_store(uri) as store:
        rows = store.query(collection, f'{F_ID} != ""', [F_ID, F_HASH, F_VECTOR], limit=16384)
        identity = store.read_identity(collection)
    ids = [r[F_ID] for r in rows]
    assert len(ids) == len(set(ids)), "a document is stored twice"
    assert sorted(ids) == sorted(d["_id"] for d in docs)
    assert {r[F_ID]: r[F_HASH] for r in rows} == {d["_id"]: content_hash(doc_text(d)) for d in docs}
    encoder = DocumentEncoder(resolve_model(identity.model["name"]), "int8", identity.calibration, device="cpu")
    table = normalize_json_lines([json.dumps(d) for d in docs], ["t"] * len(docs), DocumentSpec())
    batch = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    assert set(batch[C_STATUS]) == {S_NEW}
    want = dict(zip(batch[C_ID], encoder(batch)[C_VECTOR], strict=True))
    for row in rows:
        assert np.array_equal(np.asarray(row[F_VECTOR], dtype=np.float32), want[row[F_ID]].astype(np.float32)), row[
            F_ID
        ]


def wait_for_record(path: Path, alive, lines: int = 1) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if not alive():
            pytest.fail("the job ended before the first shard was recorded: nothing to interrupt")
        time.sleep(0.05)
    pytest.fail(f"no shard was recorded in {path} within {KILL_WAIT_S} s")


def test_incremental_run_embeds_only_new_and_changed_and_deletes_missing(tmp_path, cranfield, ray_local):
    docs = good_docs(cranfield, 80)
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:40])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[40:])
    first = backfill(tmp_path, tmp_path / "in")
    assert (first["new"], first["written"], first["unchanged"]) == (80, 80, 0)

    edited = [dict(d) for d in docs[40:]]
    edited[0]["text"] += " Revised with new measurements."
    edited[1]["title"] = "A new title"
    removed = edited.pop(5)
    edited.append({"_id": "added", "title": "Added later", "text": "hypersonic flow over a blunt cone"})
    write_jsonl(tmp_path / "in" / "b.jsonl", edited)
    second = backfill(tmp_path, tmp_path / "in", "--delete-missing")
    # a.jsonl is unchanged: its shards are skipped without being read; b.jsonl is read again and
    # only its two edited documents and the new one reach the model.
    record = [json.loads(line) for line in (tmp_path / "runs" / "docs" / "shards.jsonl").read_text().splitlines()]
    a_shards = sum(1 for r in record if r["path"].endswith("a.jsonl"))
    assert second["shards"]["skipped"] == a_shards >= 1
    assert (second["new"], second["changed"], second["unchanged"], second["deleted"]) == (1, 2, 37, 1)
    assert second["written"] == second["embedded"] == 3 and second["read"] == 40
    current = docs[:40] + edited
    assert removed["_id"] not in {d["_id"] for d in current}
    assert_collection_is(str(tmp_path / "m.db"), current)

    third = backfill(tmp_path, tmp_path / "in")  # nothing changed since: nothing is read
    assert (third["read"], third["written"], third["shards"]["read"]) == (0, 0, 0)
    # --full (everything re-embedded, still once each) is tested against the server, in
    # test_backfill_server.py, where upserts go through the real write path.


def test_driver_killed_mid_run_resumes_without_loss_or_duplicates(tmp_path, cranfield, ray_local):
    docs = good_docs(cranfield, 160)
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    # The killed driver shares the test's Ray cluster, as a `ray job submit` driver would.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(tmp_path / "job.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.backfill", *job_argv(tmp_path, src)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    record = tmp_path / "runs" / "docs" / "shards.jsonl"
    try:
        wait_for_record(record, lambda: proc.poll() is None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    recorded = len(record.read_text().splitlines())
    lite = tmp_path / "m.db"
    deadline = time.monotonic() + 30  # its Milvus Lite server goes with it
    while _lite_server_running(lite) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _lite_server_running(lite), "the killed driver's Milvus Lite server outlived it"

    resumed = backfill(tmp_path, src)
    assert resumed["shards"]["skipped"] == recorded >= 1
    assert resumed["calibration"] == "reused"
    assert_collection_is(str(lite), docs)


def _lite_server_running(db: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", f"milvus-lite server --data-dir {db}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_an_embedding_actor_killed_mid_run_loses_nothing(tmp_path, cranfield, ray_local):
    docs = good_docs(cranfield, 160)
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(backfill(tmp_path, src)))
    job.start()
    wait_for_record(tmp_path / "runs" / "docs" / "shards.jsonl", job.is_alive)
    pids = subprocess.run(["pgrep", "-f", r"MapBatches\(DocumentEncoder\)"], capture_output=True, text=True)
    victims = [int(p) for p in pids.stdout.split()]
    assert victims, "no embedding actor to kill"
    os.kill(victims[0], signal.SIGKILL)
    job.join(timeout=600)
    assert result, "the job did not finish after one of its actors was killed"
    assert result["written"] == len(docs) and result["rejected"] == 0
    assert_collection_is(str(tmp_path / "m.db"), docs)


def test_an_unreadable_shard_fails_the_job_by_name_and_the_rest_is_kept(tmp_path, cranfield, ray_local):
    docs = good_docs(cranfield, 60, words=None)  # whole abstracts: a row group of 10 fills a shard
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:30])
    table = pa.Table.from_pylist([{"_id": d["_id"], "title": d["title"], "text": d["text"]} for d in docs[30:]])
    parquet = tmp_path / "in" / "b.parquet"
    pq.write_table(table, parquet, row_group_size=10)
    corrupt_row_group(parquet, 1)

    with pytest.raises(InputDataError, match=r"shard .*b\.parquet#1-2: cannot read") as failure:
        backfill(tmp_path, tmp_path / "in")
    record = [json.loads(line) for line in (tmp_path / "runs" / "docs" / "shards.jsonl").read_text().splitlines()]
    done = {(Path(r["path"]).name, r["start"]) for r in record}
    assert ("b.parquet", 1) not in done
    assert {("b.parquet", 0), ("b.parquet", 2)} <= done and any(name == "a.jsonl" for name, _ in done)
    assert f"other {len(record)} shard(s) are finished and recorded" in str(failure.value)

    pq.write_table(table, parquet, row_group_size=10)  # the file is fixed: the rerun reads it again
    resumed = backfill(tmp_path, tmp_path / "in")
    assert resumed["shards"]["skipped"] == sum(1 for name, _ in done if name == "a.jsonl")
    assert_collection_is(str(tmp_path / "m.db"), docs)
