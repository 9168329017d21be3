"""Bulk import, the backfill's other way into Milvus (`--write-mode bulk`) for very large first loads.

Same flow as the streaming upserts up to the embedded batch; then, instead of upserting, writer
actors (`BulkStager`) write the rows as Parquet files with pymilvus's `LocalBulkWriter` into a
staging directory the Milvus server can read (`--bulk-dir`: for a standalone server with local
storage, any directory it can open, files named by absolute path; for MinIO/S3, a directory inside
the bucket as mounted on every Ray node, files named relative to `--bulk-storage-root`). When
every batch is staged the driver asks the server to import the files (`utility.do_bulk_insert`, one
task per file: Milvus 2.3 reads one Parquet file per task), waits for the tasks, checks the row
count, and deletes the staged files. Milvus builds segments from the files directly, skipping the
insert path (WAL, growing segments, compaction) that upserts go through.

Import inserts: it cannot replace rows, so it is only offered into a new or empty collection, and
only the files that writers reported back are imported (a retried Ray task leaves an orphan file
that nobody reports, never a second copy of its rows). Milvus Lite has no import at all: a clear
ConfigError before any work starts.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from reembed.documents import C_HASH, C_ID, C_TEXT, truncate_utf8
from reembed.errors import CapabilityError, ConfigError, ReembedError
from reembed.ingest import C_VECTOR, EMBED_STATUSES, BatchWriter, emit_summary_row
from reembed.store import F_HASH, F_ID, F_PARTITION, F_TEXT, F_VECTOR, MilvusStore, vector_payload

logger = logging.getLogger(__name__)

# Parquet import (one file per task) arrived in Milvus 2.3.4.
BULK_IMPORT_MIN_VERSION = (2, 3, 4)
STAGING_SUBDIR = "reembed-bulk"
# The summary row a stager returns for a staged file set (BatchWriter returns "written").
KIND_STAGED = "staged"
IMPORT_POLL_S = 1.0
VISIBLE_TIMEOUT_S = 60.0
# LocalBulkWriter starts a new file when its buffer passes this many bytes.
CHUNK_BYTES = 256 << 20


def bulk_unsupported_reason(is_lite: bool, version: str) -> str | None:
    """Why a server cannot bulk-import our Parquet files, or None when it can."""
    if is_lite:
        return (
            "Milvus Lite has no bulk import; use --write-mode upsert with a .db, or a Milvus server "
            f"(>= {'.'.join(map(str, BULK_IMPORT_MIN_VERSION))}) for bulk"
        )
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", version)
    numbers = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
    if numbers < BULK_IMPORT_MIN_VERSION:
        return (
            f"Milvus {version} cannot import Parquet files (needs >= {'.'.join(map(str, BULK_IMPORT_MIN_VERSION))}); "
            "use --write-mode upsert"
        )
    return None


def check_bulk_ready(
    store: MilvusStore, collection: str, exists: bool, bulk_dir: str | None, storage_root: str | None = None
) -> None:
    """Everything bulk mode needs, checked before any embedding."""
    reason = bulk_unsupported_reason(store.capabilities.is_lite, store.capabilities.version)
    if reason:
        error = ConfigError if store.capabilities.is_lite else CapabilityError
        raise error(f"write_mode: bulk: {reason}")
    from pymilvus import utility

    if not hasattr(utility, "do_bulk_insert"):
        raise CapabilityError(
            "write_mode: bulk: this pymilvus has no utility.do_bulk_insert (removed after 3.0); use --write-mode upsert"
        )
    if not bulk_dir:
        raise ConfigError(
            "bulk_dir: write_mode bulk needs a directory for the Parquet files that the Milvus server can read "
            "(its MinIO/S3 bucket mounted on the Ray nodes, or a local directory of a standalone server), got none"
        )
    root = Path(bulk_dir)
    if not root.is_dir():
        raise ConfigError(f"bulk_dir: expected an existing directory, got {bulk_dir!r}")
    if storage_root and Path(storage_root).resolve() not in [root.resolve(), *root.resolve().parents]:
        raise ConfigError(
            f"bulk_dir: expected a directory inside bulk_storage_root {storage_root!r} (the server names files "
            f"relative to it), got {bulk_dir!r}"
        )
    if exists:
        rows = store.count(collection)
        if rows:
            raise ConfigError(
                f"write_mode: bulk import inserts rows and cannot replace them, but collection {collection!r} "
                f"already has {rows} rows; use --write-mode upsert for it, or bulk into a new collection"
            )


def staging_dir(bulk_dir: str, collection: str) -> Path:
    """A fresh directory for this run's files under the server's storage root."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    # Absolute: writer actors run in other working directories, on other nodes.
    path = Path(bulk_dir).resolve() / STAGING_SUBDIR / collection / f"{stamp}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


class BulkStager(BatchWriter):
    """Writes the rows a BatchWriter would upsert as Parquet files (LocalBulkWriter), one set per partition.

    Returns the BatchWriter's summary (rejects, end-of-shard markers, per-shard counts with `written`
    meaning staged) plus one KIND_STAGED row per partition whose `raw` holds the JSON list of files.
    """

    def __init__(self, uri: str, token: str | None, collection: str, max_text_bytes: int, staging: str) -> None:
        from pymilvus.orm.schema import CollectionSchema

        # pymilvus's bulk writer logs every flush at INFO and forces its own logger to DEBUG.
        for name in ("bulk_writer", "pymilvus.bulk_writer"):
            logging.getLogger(name).setLevel(logging.WARNING)
        store = MilvusStore(uri, token)
        try:
            desc = store._call("describe_collection", store.client.describe_collection, collection)
        finally:
            store.close()
        # The files must match the collection the driver created: take its schema from the server.
        self.schema = CollectionSchema.construct_from_dict(desc)
        vector_type = next(f.dtype.name for f in self.schema.fields if f.name == F_VECTOR)
        self.staging = Path(staging)
        self.collection, self.vector_type, self.max_text_bytes = collection, vector_type, max_text_bytes
        self.embed_statuses = EMBED_STATUSES
        self._files: dict[str, list[str]] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        self._files = {}
        summary = super().__call__(batch)
        for partition, files in self._files.items():
            emit_summary_row(summary, KIND_STAGED, "", partition, count=0, raw=json.dumps(files))
        return summary

    def _write(self, batch: dict[str, np.ndarray], groups: dict[tuple[str, str], list[int]]) -> int:
        from pymilvus.bulk_writer import BulkFileType, LocalBulkWriter

        by_partition: dict[str, list[int]] = defaultdict(list)
        for (partition, _status), rows in groups.items():
            by_partition[partition].extend(rows)
        staged = 0
        for partition, rows in by_partition.items():
            vectors = vector_payload(batch[C_VECTOR][rows], self.vector_type)
            with LocalBulkWriter(
                schema=self.schema,
                local_path=str(self.staging / partition),
                chunk_size=CHUNK_BYTES,
                file_type=BulkFileType.PARQUET,
            ) as writer:
                for i, vec in zip(rows, vectors, strict=True):
                    writer.append_row(
                        {
                            F_ID: str(batch[C_ID][i]),
                            F_VECTOR: vec,
                            F_TEXT: truncate_utf8(str(batch[C_TEXT][i]), self.max_text_bytes),
                            F_HASH: str(batch[C_HASH][i]),
                            F_PARTITION: str(partition),
                        }
                    )
                writer.commit()
                self._files[partition] = [str(f) for group in writer.batch_files for f in group]
            staged += len(rows)
        return staged


def import_staged(
    store: MilvusStore,
    collection: str,
    staged: dict[str, list[str]],
    staging: Path,
    expected_rows: int,
    storage_root: str | None = None,
    token: str | None = None,
    timeout_s: float = 3600.0,
    keep_files: bool = False,
) -> dict[str, Any]:
    """Import the staged files (`{partition: [file, ...]}`) and wait; returns counts and timings.

    A server with local storage (a standalone) opens the absolute path it is given; one with MinIO/S3
    reads object keys, i.e. paths relative to where its bucket is mounted (`storage_root`).
    """
    from pymilvus import BulkInsertState, connections, utility

    root = Path(storage_root).resolve() if storage_root else None
    store.ensure_partitions(collection, staged)
    alias = f"reembed-bulk-{uuid.uuid4().hex[:8]}"
    # pymilvus 3.0 marks the ORM API deprecated; it is the import call that Milvus 2.3 (and later) answers.
    warnings.filterwarnings("ignore", message=".*ORM-style PyMilvus API.*")
    connections.connect(alias=alias, uri=store.uri, token=token or "")
    started = time.monotonic()
    tasks: dict[int, str] = {}
    try:
        for partition, files in staged.items():
            for file in files:
                name = str(Path(file).resolve().relative_to(root)) if root else str(Path(file).resolve())
                task = utility.do_bulk_insert(collection, files=[name], partition_name=partition, using=alias)
                tasks[task] = name
        logger.info("bulk import: %d file(s) submitted to %s", len(tasks), store.uri)
        imported = 0
        pending = dict(tasks)
        while pending:
            for task in list(pending):
                state = utility.get_bulk_insert_state(task, using=alias)
                if state.state in (BulkInsertState.ImportFailed, BulkInsertState.ImportFailedAndCleaned):
                    raise ReembedError(f"bulk import of {pending[task]!r} failed: {state.failed_reason}")
                if state.state == BulkInsertState.ImportCompleted:
                    imported += int(state.row_count)
                    del pending[task]
            if pending:
                if time.monotonic() - started > timeout_s:
                    raise ReembedError(f"bulk import: {len(pending)} file(s) not imported after {timeout_s:.0f} s")
                time.sleep(IMPORT_POLL_S)
    finally:
        connections.disconnect(alias)
    seconds = time.monotonic() - started
    # Imported segments become visible to queries once loaded; give that a moment.
    deadline = time.monotonic() + VISIBLE_TIMEOUT_S
    count = store.count(collection)
    while count != expected_rows and time.monotonic() < deadline:
        time.sleep(IMPORT_POLL_S)
        count = store.count(collection)
    if imported != expected_rows or count != expected_rows:
        raise ReembedError(
            f"bulk import into {collection!r}: {expected_rows} rows were staged, the server imported {imported} "
            f"and the collection has {count}; the staged files are kept in {staging}"
        )
    if not keep_files:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("bulk import: %d rows from %d file(s) in %.1f s", imported, len(tasks), seconds)
    return {"files": len(tasks), "rows": imported, "seconds": round(seconds, 3)}
