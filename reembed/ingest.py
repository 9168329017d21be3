"""The three per-batch steps of the backfill: find what changed, embed + quantise, write to Milvus.

Plain callable classes over numpy batches (dicts of arrays, as Ray Data hands them to
`map_batches`): jobs/pipeline.py runs them as actor pools, a unit test calls them directly.
Each loads its heavy state (model, connection) once in `__init__`.

Rows carry a status (reembed.documents): `new` rows are looked up by id in the collection and
become `unchanged` (same content hash, same partition: never shown to the model), `changed`, or
`moved` (a copy lives in another partition: it is rewritten and the stale copy deleted). Rejects
and the end-of-shard markers pass through every step untouched so that the driver can count
every row of every shard.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

from reembed.documents import (
    C_HASH,
    C_ID,
    C_PARTITION,
    C_RAW,
    C_REJECT,
    C_SHARD,
    C_SHARD_ROWS,
    C_STATUS,
    C_TEXT,
    S_CHANGED,
    S_EOF,
    S_ERROR,
    S_MOVED,
    S_NEW,
    S_REJECTED,
    S_UNCHANGED,
    truncate_utf8,
)
from reembed.embedder import Embedder, ModelSource
from reembed.quantize import Int8Calibration, binarize, encode_rerank_vectors
from reembed.store import F_HASH, F_ID, F_PARTITION, F_RERANK, F_TEXT, F_VECTOR, MilvusStore, vector_payload

logger = logging.getLogger(__name__)

C_VECTOR = "vector"
# Float16 re-rank copies (quantize.encode_rerank_vectors) where the collection keeps them.
C_RERANK = "rerank_vector"
# Rows the model embeds and the writer upserts; `--full` adds S_UNCHANGED.
EMBED_STATUSES = (S_NEW, S_CHANGED, S_MOVED)
# Columns of the writer's summary, one row per (shard, status, partition) per batch, one per
# rejected document (with its id, reason and raw record), one per end-of-shard or error marker.
# int8 values clipped in each row (0 for floats): the driver checks the calibration still fits.
C_CLIPPED = "clipped"
# Per row: real tokens the model saw, and token positions it computed (tokens + padding); 0 for
# rows it never saw. The driver sums them into the summary's tokens and padding_ratio.
C_TOKENS = "tokens"
C_PADDED = "padded_tokens"
SUMMARY_COLUMNS = (
    "kind",
    "shard",
    "partition",
    "count",
    "written",
    "id",
    "reason",
    "raw",
    "clipped",
    "tokens",
    "padded_tokens",
)


def emit_summary_row(
    summary: dict[str, list[Any]],
    kind: str,
    shard: str,
    partition: str = "",
    count: int = 1,
    written: int = 0,
    doc_id: str = "",
    reason: str = "",
    raw: str = "",
    clipped: int = 0,
    tokens: tuple[int, int] = (0, 0),
) -> None:
    """Append one row of SUMMARY_COLUMNS to a writer's summary batch."""
    values = (kind, shard, partition, count, written, doc_id, reason, raw, clipped, *tokens)
    for col, value in zip(SUMMARY_COLUMNS, values, strict=True):
        summary[col].append(value)


def embed_mask(statuses: np.ndarray, embed_statuses: tuple[str, ...]) -> np.ndarray:
    return np.isin(statuses, np.asarray(embed_statuses, dtype=object))


class ChangeDetector:
    """Marks each `new` row `unchanged`, `changed` or `moved` from what the collection holds.

    One query per batch (`id in [...]`) for the stored content hash and partition of its ids. A
    row counts as unchanged only if exactly one stored copy exists, in the row's partition, with
    the same content hash; anything else (a changed text, a copy elsewhere, a copy twice after a
    crash mid-move) is embedded and written again.
    """

    def __init__(self, uri: str, token: str | None, collection: str, keep_unchanged_text: bool = False) -> None:
        self.store = MilvusStore(uri, token)
        self.collection = collection
        self.keep_unchanged_text = keep_unchanged_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        statuses = batch[C_STATUS].copy()
        todo = np.flatnonzero(statuses == S_NEW)
        if not len(todo):
            return batch
        stored = self.store.stored_versions(self.collection, batch[C_ID][todo].tolist())
        for i in todo:
            copies = stored.get(batch[C_ID][i])
            if not copies:
                continue
            partition, digest = batch[C_PARTITION][i], batch[C_HASH][i]
            if any(p != partition for p, _ in copies):
                statuses[i] = S_MOVED
            elif len(copies) == 1 and copies[0][1] == digest:
                statuses[i] = S_UNCHANGED
            else:
                statuses[i] = S_CHANGED
        out = dict(batch)
        out[C_STATUS] = statuses
        if not self.keep_unchanged_text:
            # The model never sees unchanged rows: do not carry their text through the pipeline.
            texts = batch[C_TEXT].copy()
            texts[statuses == S_UNCHANGED] = ""
            out[C_TEXT] = texts
        return out


class DocumentEncoder:
    """Embeds the rows to (re-)embed; adds a `vector` column (int8 codes, packed sign bits or
    float32), a `clipped` column (int8 values clipped in the row), the row's `tokens` /
    `padded_tokens` and, with `rerank`, a `rerank_vector` column of float16 copies.

    With no calibration and precision int8, it returns floats: that is the calibration sample.
    Other rows (rejects, unchanged, end-of-shard markers) get a zero vector and never reach the model.
    """

    def __init__(
        self,
        source: ModelSource,
        precision: str,
        calibration_json: str | None,
        device: str = "auto",
        batch_size: int | str = 64,
        threads: int | None = 1,
        embed_statuses: tuple[str, ...] = EMBED_STATUSES,
        dtype: str = "auto",
        backend: str = "torch",
        rerank: bool = False,
    ) -> None:
        self.embedder = Embedder(
            source, device=device, threads=threads, batch_size=batch_size, dtype=dtype, backend=backend
        )
        self.calibration = Int8Calibration.from_json(calibration_json) if calibration_json else None
        self.emit_codes = precision == "int8" and self.calibration is not None
        self.binary = precision == "binary"
        self.rerank = rerank
        self.embed_statuses = embed_statuses

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        todo = embed_mask(batch[C_STATUS], self.embed_statuses)
        n, d = len(todo), self.embedder.dimension
        if self.binary:
            vectors = np.zeros((n, (d + 7) // 8), dtype=np.uint8)
        else:
            vectors = np.zeros((n, d), dtype=np.int8 if self.emit_codes else np.float32)
        copies = np.full(n, "", dtype=object) if self.rerank else None
        clipped = np.zeros(n, dtype=np.int32)
        tokens = np.zeros(n, dtype=np.int32)
        padded = np.zeros(n, dtype=np.int32)
        if todo.any():
            encoded = self.embedder.encode_documents_counted(batch[C_TEXT][todo].tolist())
            floats = encoded.vectors
            tokens[todo], padded[todo] = encoded.tokens, encoded.padded
            if self.emit_codes:
                vectors[todo] = self.calibration.quantize(floats)
                clipped[todo] = self.calibration.clipped_per_row(floats)
            elif self.binary:
                vectors[todo] = binarize(floats)
            else:
                vectors[todo] = floats
            if copies is not None:
                copies[todo] = encode_rerank_vectors(floats)
        out = dict(batch)
        out[C_VECTOR] = vectors
        if copies is not None:
            out[C_RERANK] = copies
        out[C_CLIPPED] = clipped
        out[C_TOKENS] = tokens
        out[C_PADDED] = padded
        return out


class BatchWriter:
    """Upserts the embedded rows of a batch into their partitions; returns a small summary."""

    def __init__(
        self,
        uri: str,
        token: str | None,
        collection: str,
        vector_type: str,
        max_text_bytes: int,
        embed_statuses: tuple[str, ...] = EMBED_STATUSES,
    ) -> None:
        self.store = MilvusStore(uri, token)
        self.collection = collection
        self.vector_type = vector_type
        self.max_text_bytes = max_text_bytes
        self.embed_statuses = embed_statuses

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        summary: dict[str, list[Any]] = {c: [] for c in SUMMARY_COLUMNS}

        def emit(kind, shard, partition="", **values):
            emit_summary_row(summary, kind, shard, partition, **values)

        groups: dict[tuple[str, str], list[int]] = defaultdict(list)  # (partition, status) -> rows
        counts: dict[tuple[str, str, str], int] = defaultdict(int)  # (shard, status, partition) -> rows
        clipped: dict[tuple[str, str, str], int] = defaultdict(int)  # same key -> int8 values clipped
        tokens: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])  # same key -> (real, padded)
        zeros = np.zeros(len(batch[C_STATUS]), dtype=np.int32)
        row_clipped = batch.get(C_CLIPPED, zeros)
        row_tokens, row_padded = batch.get(C_TOKENS, zeros), batch.get(C_PADDED, zeros)
        for i, status in enumerate(batch[C_STATUS]):
            shard = batch[C_SHARD][i]
            if status == S_REJECTED:
                emit(S_REJECTED, shard, doc_id=batch[C_ID][i], reason=batch[C_REJECT][i], raw=batch[C_RAW][i])
            elif status == S_EOF:
                emit(S_EOF, shard, count=int(batch[C_SHARD_ROWS][i]))
            elif status == S_ERROR:
                emit(S_ERROR, shard, reason=batch[C_REJECT][i])
            else:
                counts[(shard, status, batch[C_PARTITION][i])] += 1
                clipped[(shard, status, batch[C_PARTITION][i])] += int(row_clipped[i])
                counted = tokens[(shard, status, batch[C_PARTITION][i])]
                counted[0] += int(row_tokens[i])
                counted[1] += int(row_padded[i])
                if status in self.embed_statuses:
                    groups[(batch[C_PARTITION][i], status)].append(i)
        written_rows = self._write(batch, groups)
        for (shard, status, partition), n in counts.items():
            written = n if status in self.embed_statuses else 0
            key = (shard, status, partition)
            emit(status, shard, partition, count=n, written=written, clipped=clipped[key], tokens=tuple(tokens[key]))
        if written_rows != sum(len(r) for r in groups.values()):
            raise RuntimeError(f"Milvus acknowledged {written_rows} rows of {sum(len(r) for r in groups.values())}")
        return summary

    def _write(self, batch: dict[str, np.ndarray], groups: dict[tuple[str, str], list[int]]) -> int:
        by_partition: dict[str, list[int]] = defaultdict(list)
        moved: dict[str, list[str]] = defaultdict(list)
        for (partition, status), rows in groups.items():
            by_partition[partition].extend(rows)
            if status == S_MOVED:
                moved[partition].extend(batch[C_ID][i] for i in rows)
        if by_partition:
            self.store.ensure_partitions(self.collection, by_partition)
        written = 0
        for partition, rows in by_partition.items():
            vectors = vector_payload(batch[C_VECTOR][rows], self.vector_type)
            payload = [
                {
                    F_ID: batch[C_ID][i],
                    F_VECTOR: vec,
                    F_TEXT: truncate_utf8(batch[C_TEXT][i], self.max_text_bytes),
                    F_HASH: batch[C_HASH][i],
                    F_PARTITION: partition,
                }
                for i, vec in zip(rows, vectors, strict=True)
            ]
            if C_RERANK in batch:
                for row, i in zip(payload, rows, strict=True):
                    row[F_RERANK] = batch[C_RERANK][i]
            written += self.store.upsert(self.collection, partition, payload)
            if moved.get(partition):
                # Upsert replaces a row only within its partition: drop the copies left elsewhere.
                self.store.delete_ids_outside(self.collection, partition, moved[partition])
        return written
