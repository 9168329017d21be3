"""The three per-batch steps of the backfill: find what changed, embed + quantise, write to Milvus.

Plain callable classes over numpy batches (dicts of arrays, as Ray Data hands them to
`map_batches`): jobs/pipeline.py runs them as actor pools, a unit test calls them directly.
Each loads its heavy state (model, connection) once in `__init__`.

Rows carry a status (reembed.documents): `new` rows are looked up by id in the collection and
become `unchanged` (same content hash, same partition: never shown to the model), `changed`, or
`moved` (a copy lives in another partition: its copies are deleted, then it is written anew). Rejects
and the end-of-shard markers pass through every step untouched so that the driver can count
every row of every shard.

A bad row costs only itself here too. A batch the model fails on is embedded again row by row,
an upsert Milvus refuses is bisected down to the rows it refuses; such a row becomes `rejected`
with its reason, and is counted once, as a reject. Where every row fails on its own, the rows are
blamed only if the model still embeds a plain text (or Milvus calls the input wrong); otherwise the
model or the store is at fault, not the data, and the first error is raised as it was.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import numpy as np

from reembed.batching import is_out_of_memory
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
    raw_json,
    storable_text,
    truncate_utf8,
)
from reembed.embedder import Embedder, ModelSource
from reembed.errors import ReembedError
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
# The longest error message a reject's reason quotes.
REASON_MAX_CHARS = 500
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


# A text any model embeds: the check that a model failing on every row of a batch still works.
CANARY_TEXT = "a"


def is_resource_error(exc: BaseException) -> bool:
    """Out of memory, in any of its forms: a lack of resources, never a fault of the row at hand."""
    return is_out_of_memory(exc) or "out of memory" in str(exc).lower()


def failure_reason(what: str, message: str) -> str:
    """`what: message` for a reject, the message cut to REASON_MAX_CHARS (a model or a server may
    quote the whole input back) and kept valid Unicode."""
    if len(message) > REASON_MAX_CHARS:
        message = message[:REASON_MAX_CHARS] + "..."
    return storable_text(f"{what}: {message}")


def row_raw(doc_id: str, text: str) -> str:
    """The raw record of a row rejected after reading (its input line is gone by then): id and text."""
    return raw_json({"id": doc_id, "text": text})


REASON_MOVE_DEFERRED = (
    "move deferred: the document changed partition, but some shard of the input could not be read whole, so "
    "it is not moved in this run (its stored copy stays); fix the input and rerun"
)


class ChangeDetector:
    """Marks each `new` row `unchanged`, `changed` or `moved` from what the collection holds.

    One query per batch (`id in [...]`; one per partition with field partitioning: __init__) for
    the stored content hash and partition of its ids. A row counts as unchanged only if exactly one
    stored copy exists, in the row's partition, with the same content hash; anything else (a changed
    text, a copy elsewhere, a copy twice after a crash mid-move) is embedded and written again.

    With `allow_moves` False (some shard of the input could not be read whole, so a copy of an id
    may hide in it) a row that would move is rejected instead, with the reason: its stored copy
    stays where it is until a run that reads the whole input.
    """

    def __init__(
        self,
        uri: str,
        token: str | None,
        collection: str,
        keep_unchanged_text: bool = False,
        allow_moves: bool = True,
        per_partition: bool = False,
    ) -> None:
        self.store = MilvusStore(uri, token)
        self.collection = collection
        self.keep_unchanged_text = keep_unchanged_text
        self.allow_moves = allow_moves
        # Field partitioning: a document can move, and a copy left in its old partition is invisible
        # to a query over the whole collection, so each partition is asked. Copies can only be in
        # partitions that existed before this run (an id appears once in the input).
        self.partitions = self.store.list_partitions(collection) if per_partition else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        statuses = batch[C_STATUS].copy()
        todo = np.flatnonzero(statuses == S_NEW)
        if not len(todo):
            return batch
        stored = self.store.stored_versions(self.collection, batch[C_ID][todo].tolist(), self.partitions)
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
        if not self.allow_moves and (statuses == S_MOVED).any():
            deferred = statuses == S_MOVED
            statuses[deferred] = S_REJECTED
            reasons, raws = batch[C_REJECT].copy(), batch[C_RAW].copy()
            for i in np.flatnonzero(deferred):
                reasons[i] = REASON_MOVE_DEFERRED
                raws[i] = json.dumps({"id": batch[C_ID][i], "partition": batch[C_PARTITION][i]}, ensure_ascii=False)
            out[C_REJECT], out[C_RAW] = reasons, raws
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
    A row the model fails on alone becomes `rejected` ("embed failed: ..."), with a zero vector.
    """

    def __init__(
        self,
        source: ModelSource | None,
        precision: str,
        calibration_json: str | None,
        device: str = "auto",
        batch_size: int | str = 64,
        threads: int | None = 1,
        embed_statuses: tuple[str, ...] = EMBED_STATUSES,
        dtype: str = "auto",
        backend: str = "torch",
        rerank: bool = False,
        embedder: Embedder | None = None,
    ) -> None:
        if embedder is None:
            embedder = Embedder(
                source, device=device, threads=threads, batch_size=batch_size, dtype=dtype, backend=backend
            )
        self.embedder = embedder
        self.calibration = Int8Calibration.from_json(calibration_json) if calibration_json else None
        self.emit_codes = precision == "int8" and self.calibration is not None
        self.binary = precision == "binary"
        self.rerank = rerank
        self.embed_statuses = embed_statuses

    @classmethod
    def with_embedder(
        cls,
        embedder: Embedder,
        precision: str,
        calibration_json: str | None,
        embed_statuses: tuple[str, ...] = EMBED_STATUSES,
        rerank: bool = False,
    ) -> DocumentEncoder:
        """An encoder over an embedder built elsewhere (a test's fake model)."""
        return cls(None, precision, calibration_json, embed_statuses=embed_statuses, rerank=rerank, embedder=embedder)

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
        out = dict(batch)
        if todo.any():
            floats, tokens[todo], padded[todo], failed = self._encode_isolating(batch[C_TEXT][todo].tolist())
            if self.emit_codes:
                vectors[todo] = self.calibration.quantize(floats)
                clipped[todo] = self.calibration.clipped_per_row(floats)
            elif self.binary:
                vectors[todo] = binarize(floats)
            else:
                vectors[todo] = floats
            if copies is not None:
                copies[todo] = encode_rerank_vectors(floats)
            if failed:
                positions = np.flatnonzero(todo)
                reasons = {int(positions[k]): why for k, why in failed.items()}
                rows = list(reasons)
                vectors[rows], clipped[rows], tokens[rows], padded[rows] = 0, 0, 0, 0
                if copies is not None:
                    copies[rows] = ""
                out.update(self._rejected(batch, reasons))
        out[C_VECTOR] = vectors
        if copies is not None:
            out[C_RERANK] = copies
        out[C_CLIPPED] = clipped
        out[C_TOKENS] = tokens
        out[C_PADDED] = padded
        return out

    def _encode_isolating(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """(floats (n, dimension) float32, tokens (n,), padded (n,), {k: reason} of texts the model
        fails on alone, whose rows stay zero). Raises the batch's error when every text fails alone."""
        try:
            encoded = self.embedder.encode_documents_counted(texts)
            return encoded.vectors, encoded.tokens, encoded.padded, {}
        except Exception as exc:
            if is_resource_error(exc):
                raise  # another batch size or device may fit; the rows are not at fault
            error = exc
        n = len(texts)
        floats = np.zeros((n, self.embedder.dimension), dtype=np.float32)
        tokens, padded = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        failed: dict[int, str] = {}
        for k, text in enumerate(texts):
            try:
                one = self.embedder.encode_documents_counted([text])
            except Exception as exc:
                if is_resource_error(exc):
                    raise
                failed[k] = failure_reason("embed failed", f"{type(exc).__name__}: {exc}")
                continue
            floats[k], tokens[k], padded[k] = one.vectors[0], one.tokens[0], one.padded[0]
        if len(failed) == n and not self._model_works():
            raise error  # the model fails on anything: not the rows' fault
        logger.warning("the model failed on a batch of %d: %d row(s) rejected, the rest embedded", n, len(failed))
        return floats, tokens, padded, failed

    def _model_works(self) -> bool:
        """Whether the model embeds a plain text: tells rows the model cannot take (rejects, even a
        batch of one) from a model that fails on everything (an error to raise)."""
        try:
            self.embedder.encode_documents_counted([CANARY_TEXT])
        except Exception as exc:
            if is_resource_error(exc):
                raise
            return False
        return True

    @staticmethod
    def _rejected(batch: dict[str, np.ndarray], reasons: dict[int, str]) -> dict[str, np.ndarray]:
        """The status, reject and raw columns of `batch` with rows `reasons` made rejects."""
        statuses, rejects, raws = batch[C_STATUS].copy(), batch[C_REJECT].copy(), batch[C_RAW].copy()
        for i, reason in reasons.items():
            statuses[i], rejects[i], raws[i] = S_REJECTED, reason, row_raw(batch[C_ID][i], batch[C_TEXT][i])
        return {C_STATUS: statuses, C_REJECT: rejects, C_RAW: raws}


class BatchWriter:
    """Upserts the embedded rows of a batch into their partitions; returns a small summary.

    A row Milvus refuses on its own is a reject in the summary ("Milvus refused the row: ..."),
    counted there only, never as written.
    """

    def __init__(
        self,
        uri: str,
        token: str | None,
        collection: str,
        vector_type: str,
        max_text_bytes: int,
        embed_statuses: tuple[str, ...] = EMBED_STATUSES,
        store: MilvusStore | None = None,
    ) -> None:
        self.store = store if store is not None else MilvusStore(uri, token)
        self.collection = collection
        self.vector_type = vector_type
        self.max_text_bytes = max_text_bytes
        self.embed_statuses = embed_statuses

    @classmethod
    def with_store(
        cls,
        store: MilvusStore,
        collection: str,
        vector_type: str,
        max_text_bytes: int,
        embed_statuses: tuple[str, ...] = EMBED_STATUSES,
    ) -> BatchWriter:
        """A writer over a store opened elsewhere (a test's fake store)."""
        return cls("", None, collection, vector_type, max_text_bytes, embed_statuses, store=store)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        summary: dict[str, list[Any]] = {c: [] for c in SUMMARY_COLUMNS}

        def emit(kind, shard, partition="", **values):
            emit_summary_row(summary, kind, shard, partition, **values)

        groups: dict[tuple[str, str], list[int]] = defaultdict(list)  # (partition, status) -> rows
        counted: dict[tuple[str, str, str], list[int]] = defaultdict(list)  # (shard, status, partition) -> rows
        for i, status in enumerate(batch[C_STATUS]):
            shard = batch[C_SHARD][i]
            if status == S_REJECTED:
                emit(S_REJECTED, shard, doc_id=batch[C_ID][i], reason=batch[C_REJECT][i], raw=batch[C_RAW][i])
            elif status == S_EOF:
                emit(S_EOF, shard, count=int(batch[C_SHARD_ROWS][i]))
            elif status == S_ERROR:
                emit(S_ERROR, shard, reason=batch[C_REJECT][i])
            else:
                counted[(shard, status, batch[C_PARTITION][i])].append(i)
                if status in self.embed_statuses:
                    groups[(batch[C_PARTITION][i], status)].append(i)
        self._refused: dict[int, str] = {}  # row -> why Milvus refused it; filled by _write
        written_rows = self._write(batch, groups)
        refused = self._refused
        for i, reason in refused.items():
            # Counted here as a reject and nowhere else: the driver sees each row of a shard once.
            raw = row_raw(batch[C_ID][i], batch[C_TEXT][i])
            emit(S_REJECTED, batch[C_SHARD][i], doc_id=batch[C_ID][i], reason=reason, raw=raw)
        zeros = np.zeros(len(batch[C_STATUS]), dtype=np.int32)
        row_clipped = batch.get(C_CLIPPED, zeros)
        row_tokens, row_padded = batch.get(C_TOKENS, zeros), batch.get(C_PADDED, zeros)
        for (shard, status, partition), rows in counted.items():
            kept = [i for i in rows if i not in refused]
            if not kept:
                continue
            n = len(kept)
            written = n if status in self.embed_statuses else 0
            clipped = int(row_clipped[kept].sum())
            tokens = (int(row_tokens[kept].sum()), int(row_padded[kept].sum()))
            emit(status, shard, partition, count=n, written=written, clipped=clipped, tokens=tokens)
        expected = sum(len(r) for r in groups.values()) - len(refused)
        if written_rows != expected:
            raise RuntimeError(f"Milvus acknowledged {written_rows} rows of {expected}")
        return summary

    def _write(self, batch: dict[str, np.ndarray], groups: dict[tuple[str, str], list[int]]) -> int:
        by_partition: dict[str, list[int]] = defaultdict(list)
        moved: dict[str, list[int]] = defaultdict(list)
        for (partition, status), rows in groups.items():
            by_partition[partition].extend(rows)
            if status == S_MOVED:
                moved[partition].extend(rows)
        if by_partition:
            self.store.ensure_partitions(self.collection, by_partition)
        written = 0
        for partition, rows in by_partition.items():
            moved_ids = [batch[C_ID][i] for i in moved.get(partition, [])]
            if moved_ids:
                # A moved document's copies go before its new one is written: an upsert replaces a
                # row only within its own partition, and no delete can name one partition's copy on
                # Milvus Lite (it ignores partition_name there; see MilvusStore.delete_before_rewrite
                # for its other trap). A crash in between leaves the
                # document absent, which the rerun finds and writes: never twice, never lost.
                self.store.delete_before_rewrite(self.collection, moved_ids)
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
            written += self._upsert_isolating(partition, payload, rows)
        return written

    def _upsert_isolating(self, partition: str, payload: list[dict[str, Any]], rows: list[int]) -> int:
        """Upsert one partition's rows; returns the rows written. Rows Milvus refuses (a non-retriable
        error) are found by bisection and go into self._refused, unless it refuses every row alone:
        then the first error is raised. Retriable errors are raised as they are."""
        try:
            return self.store.upsert(self.collection, partition, payload)
        except ReembedError as exc:
            if exc.retriable:
                raise
            error = exc
        refused: dict[int, str] = {}
        if len(rows) > 1:
            written = self._bisect(partition, payload, rows, refused)
        else:
            written, refused[rows[0]] = 0, failure_reason("Milvus refused the row", str(error))
        # Every row refused alone: the data's fault only where Milvus says the input is wrong (a
        # group of one included); otherwise the store is at fault, and its error is raised.
        if len(refused) == len(rows) and not error.is_input_error:
            raise error
        logger.warning(
            "Milvus refused an upsert of %d rows into %s: %d row(s) rejected, the rest written",
            len(rows),
            partition,
            len(refused),
        )
        self._refused.update(refused)
        return written

    def _bisect(self, partition: str, payload: list[dict[str, Any]], rows: list[int], refused: dict[int, str]) -> int:
        """Upsert each half of rows that Milvus refused together; a row refused alone goes into refused.
        An upsert is idempotent, so rows a failed request did write are written again harmlessly."""
        written = 0
        mid = len(rows) // 2
        for part, part_rows in ((payload[:mid], rows[:mid]), (payload[mid:], rows[mid:])):
            try:
                written += self.store.upsert(self.collection, partition, part)
            except ReembedError as exc:
                if exc.retriable:
                    raise
                if len(part_rows) == 1:
                    refused[part_rows[0]] = failure_reason("Milvus refused the row", str(exc))
                else:
                    written += self._bisect(partition, part, part_rows, refused)
        return written
