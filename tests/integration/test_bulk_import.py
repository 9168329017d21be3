"""`--write-mode bulk` for real: Parquet from pymilvus's LocalBulkWriter in the Ray job, imported by the
Milvus 2.3.5 server (local storage: it opens them by absolute path); refused before any work on Milvus Lite and into a
collection that already has rows."""

from __future__ import annotations

import pytest

from jobs.backfill import parse_config, run
from reembed.bulk import STAGING_SUBDIR
from reembed.errors import ConfigError
from reembed.lite import LiteServer
from reembed.search import Searcher
from reembed.store import F_ID, F_PARTITION, MilvusStore
from tests.conftest import cranfield_docs, write_jsonl
from tests.integration.test_backfill_lite import backfill_argv

pytestmark = pytest.mark.integration


def test_bulk_is_refused_on_milvus_lite_before_any_work(tmp_path):
    """A Lite server behind an http:// URI passes the config check; the server's version stops it."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"_id": "1", "text": "a document"}])
    with LiteServer(str(tmp_path / "lite.db")) as uri:
        argv = backfill_argv(tmp_path, src, collection="bulk_lite", milvus_uri=uri)
        argv += ["--write-mode", "bulk", "--bulk-dir", str(tmp_path)]
        with pytest.raises(ConfigError, match="write_mode: bulk: Milvus Lite has no bulk import"):
            run(parse_config(argv))
        store = MilvusStore(uri)
        try:
            assert not store.has_collection("bulk_lite")
        finally:
            store.close()
    assert not (tmp_path / "runs").exists() and not (tmp_path / STAGING_SUBDIR).exists()


@pytest.mark.milvus_server
@pytest.mark.slow  # the stager's files and summary rows are unit-tested on every run (test_ingest.py)
def test_bulk_backfill_into_milvus_server(tmp_path, cranfield, ray_local, milvus_server):
    docs = cranfield_docs(cranfield, 128)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    argv = backfill_argv(tmp_path, src, collection="bulk_docs", milvus_uri=milvus_server, partitions=2)
    # The standalone server has local storage: it opens the staged files by absolute path.
    staging = tmp_path / "staging"
    staging.mkdir()
    argv += ["--write-mode", "bulk", "--bulk-dir", str(staging), "--bulk-file-rows", "32"]
    store = MilvusStore(milvus_server)
    try:
        summary = run(parse_config(argv))
        assert summary["write_mode"] == "bulk" and summary["written"] == 128 and summary["rejected"] == 0
        # At least one Parquet file per 32 rows, all imported.
        assert summary["bulk_import"]["rows"] == 128 and summary["bulk_import"]["files"] >= 4
        rows = store.query("bulk_docs", f'{F_ID} != ""', [F_ID, F_PARTITION], limit=1000)
        assert sorted(r[F_ID] for r in rows) == sorted(d["_id"] for d in docs)
        assert {r[F_PARTITION] for r in rows} == {"part_0000", "part_0001"}
        hits, _ = Searcher(store, "bulk_docs", device="cpu").search([docs[11]["title"]], k=3, ef=64)
        assert hits[0][0].id == docs[11]["_id"]
        # The staged copies are gone once the import is verified.
        staged = staging / STAGING_SUBDIR / "bulk_docs"
        assert not any(staged.rglob("*.parquet"))

        # Import inserts: a second bulk run into a collection with rows is refused before any work.
        with pytest.raises(ConfigError, match="already has 128 rows; use --write-mode upsert"):
            run(parse_config(argv))
        assert store.count("bulk_docs") == 128
    finally:
        if store.has_collection("bulk_docs"):
            store.drop_collection("bulk_docs")
        store.close()
