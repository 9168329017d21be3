"""The two per-batch steps of the backfill: embed + quantise, then write to Milvus.

Plain callable classes over numpy batches (dicts of arrays, as Ray Data hands them to
`map_batches`): jobs/pipeline.py runs them as actor pools, a unit test calls them directly.
Both load their heavy state (model, connection) once in `__init__`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

from reembed.documents import C_HASH, C_ID, C_PARTITION, C_RAW, C_REJECT, C_SOURCE, C_TEXT, truncate_utf8
from reembed.embedder import Embedder, ModelSource
from reembed.quantize import Int8Calibration
from reembed.store import F_HASH, F_ID, F_PARTITION, F_TEXT, F_VECTOR, MilvusStore, vector_payload

logger = logging.getLogger(__name__)

C_VECTOR = "vector"
# int8 values clipped in each row (0 for floats): the driver checks the calibration still fits.
C_CLIPPED = "clipped"
# Columns of the writer's summary: one "written" row per partition per batch (with the values
# clipped in it), one "rejected" row per bad document (with where it came from and the raw record).
SUMMARY_COLUMNS = ("kind", "partition", "count", "id", "source", "reason", "raw", "clipped")


class DocumentEncoder:
    """Embeds the good documents of a batch; adds a `vector` column (int8 codes or float32) and a
    `clipped` column (int8 values clipped in the row).

    With no calibration and precision int8, it returns floats: that is the calibration sample.
    Rejected rows get a zero vector and are never shown to the model.
    """

    def __init__(
        self,
        source: ModelSource,
        precision: str,
        calibration_json: str | None,
        device: str = "auto",
        batch_size: int = 64,
        threads: int | None = 1,
    ) -> None:
        self.embedder = Embedder(source, device=device, threads=threads, batch_size=batch_size)
        self.calibration = Int8Calibration.from_json(calibration_json) if calibration_json else None
        self.emit_codes = precision == "int8" and self.calibration is not None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch[C_REJECT] == ""
        n, d = len(good), self.embedder.dimension
        vectors = np.zeros((n, d), dtype=np.int8 if self.emit_codes else np.float32)
        clipped = np.zeros(n, dtype=np.int32)
        if good.any():
            floats = self.embedder.encode_documents(batch[C_TEXT][good].tolist())
            if self.emit_codes:
                vectors[good] = self.calibration.quantize(floats)
                clipped[good] = self.calibration.clipped_per_row(floats)
            else:
                vectors[good] = floats
        out = dict(batch)
        out[C_VECTOR] = vectors
        out[C_CLIPPED] = clipped
        return out


class BatchWriter:
    """Upserts the good documents of a batch into their partitions; returns a small summary."""

    def __init__(
        self,
        uri: str,
        token: str | None,
        collection: str,
        vector_type: str,
        max_text_bytes: int,
        partition_by_field: bool,
    ) -> None:
        self.store = MilvusStore(uri, token)
        self.collection = collection
        self.vector_type = vector_type
        self.max_text_bytes = max_text_bytes
        self.partition_by_field = partition_by_field

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        summary: dict[str, list[Any]] = {c: [] for c in SUMMARY_COLUMNS}
        by_partition: dict[str, list[int]] = defaultdict(list)
        for i, reason in enumerate(batch[C_REJECT]):
            if reason:
                for col, value in zip(
                    SUMMARY_COLUMNS,
                    ("rejected", "", 0, batch[C_ID][i], batch[C_SOURCE][i], reason, batch[C_RAW][i], 0),
                    strict=True,
                ):
                    summary[col].append(value)
            else:
                by_partition[batch[C_PARTITION][i]].append(i)
        self.store.ensure_partitions(self.collection, by_partition)
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
            written = self.store.upsert(self.collection, partition, payload)
            if self.partition_by_field:
                self.store.delete_ids_outside(self.collection, partition, [p[F_ID] for p in payload])
            clipped = int(batch[C_CLIPPED][rows].sum()) if C_CLIPPED in batch else 0
            for col, value in zip(
                SUMMARY_COLUMNS, ("written", partition, written, "", "", "", "", clipped), strict=True
            ):
                summary[col].append(value)
        return summary
