"""`python -m jobs.backfill`: embed a corpus into Milvus partitions, int8 codes by default.

Runs locally (starting Ray itself) and unchanged under
`ray job submit --working-dir . -- python -m jobs.backfill ...`. Everything that can be checked
(config, input files and fields, the model, Milvus and the collection's identity) is checked
before any embedding. The last line on stdout is one JSON summary; a manifest and a rejects file
are written under --output-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs.ray_init import init_ray
from reembed import bulk
from reembed.config import BackfillConfig, load_settings
from reembed.documents import (
    S_CHANGED,
    S_EOF,
    S_ERROR,
    S_MOVED,
    S_NEW,
    S_REJECTED,
    S_UNCHANGED,
    DocumentSpec,
    hash_partition_name,
)
from reembed.embedder import describe_model, padding_ratio
from reembed.errors import ConfigError, InputDataError, ReembedError, root_cause
from reembed.ingest import EMBED_STATUSES, REASON_MOVE_DEFERRED, SUMMARY_COLUMNS
from reembed.inputs import inspect_input
from reembed.lite import LiteServer, is_lite_uri
from reembed.quantize import RERANK_ENCODING, Int8Calibration, clipping_report, fit_int8
from reembed.shards import Shard, auto_shard_bytes, plan_shards
from reembed.state import STATE_FILE, ShardLog, run_key
from reembed.store import DEFAULT_PARTITION, F_TEXT, CollectionIdentity, MilvusStore

logger = logging.getLogger("jobs.backfill")
PROGRESS_EVERY_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.backfill", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="JSON, TOML or YAML file of settings (flags override it)")
    p.add_argument("--input", help="JSONL/Parquet file, directory, or pyarrow filesystem URI")
    p.add_argument("--id-field", help="document id field (default _id)")
    p.add_argument("--text-fields", help="comma-separated fields joined with one space (default title,text)")
    p.add_argument("--partition-by", help="one Milvus partition per value of this field")
    p.add_argument("--partitions", type=int, help="N partitions by hash of the id (default 1)")
    p.add_argument("--model", help="hub name or local path (default all-MiniLM-L6-v2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype (default auto: float16 on CUDA, float32 on the CPU)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "onnx", "openvino"],
        help="torch (default), or an int8 CPU backend: onnx (pip install 'reembed[onnx]'), openvino",
    )
    p.add_argument("--actors-per-gpu", type=int, help="embedding actors sharing each GPU (default 1)")
    p.add_argument(
        "--precision",
        choices=["int8", "float32", "binary"],
        help="int8 codes (default), float32, or binary sign bits with re-rank copies (needs a Milvus server)",
    )
    p.add_argument(
        "--rerank",
        action="store_true",
        default=None,
        help="keep float16 re-rank copies beside the codes: the service searches in two stages",
    )
    p.add_argument("--int8-scheme", choices=["global", "per-dim"])
    p.add_argument("--calibration-sample", type=int, help="documents the int8 scale is fitted on")
    p.add_argument("--calibration-quantile", type=float, help="quantile of |x| that maps to 127")
    p.add_argument("--milvus-uri", help="Milvus URI or a Milvus Lite .db path (default ./data/reembed.db)")
    p.add_argument("--milvus-token", help="Milvus token (user:password), or REEMBED_MILVUS_TOKEN")
    p.add_argument("--collection", help="collection name (default documents)")
    p.add_argument("--hnsw-m", type=int)
    p.add_argument("--hnsw-ef-construction", type=int)
    p.add_argument("--actors", type=int, help="embedding actors (default: one per GPU, else one per CPU core)")
    p.add_argument(
        "--threads-per-actor",
        type=int,
        help="torch threads per CPU actor (default 1; more breaks bit-identical codes across batches)",
    )
    p.add_argument(
        "--batch-size",
        help="texts per model forward pass, or 'auto': probed once per actor, halved on out-of-memory, cached "
        "(default 64)",
    )
    p.add_argument("--writers", type=int, help="writer actors (default: one per GPU, else one per 8 CPU actors)")
    p.add_argument("--write-batch-rows", type=int, help="rows per upsert request (before the byte cap)")
    p.add_argument("--max-text-bytes", type=int, help="stored text is cut to this many UTF-8 bytes")
    p.add_argument(
        "--write-mode",
        choices=["upsert", "bulk"],
        help="upsert (default): streaming, idempotent; bulk: Parquet + server import into a new collection",
    )
    p.add_argument("--bulk-dir", help="bulk: where Parquet files are staged; the Milvus server must read it")
    p.add_argument(
        "--bulk-storage-root",
        help="bulk: where the server's MinIO/S3 bucket is mounted (files named relative to it); default: "
        "absolute paths, for a server with local storage",
    )
    p.add_argument("--bulk-file-rows", type=int, help="bulk: rows per staged batch of Parquet files")
    p.add_argument("--output-dir", help="run manifests, rejects and the resume record (default ./data/runs)")
    p.add_argument(
        "--full", action="store_true", default=None, help="re-embed every document, not only new and changed ones"
    )
    p.add_argument(
        "--delete-missing",
        action="store_true",
        default=None,
        help="delete stored documents that the input no longer has",
    )
    p.add_argument("--max-delete-fraction", type=float, help="refuse to delete more than this share (default 0.5)")
    p.add_argument("--shard-bytes", type=int, help="input bytes per shard (default: about 8 shards per actor)")
    p.add_argument("--checkpoint-interval-s", type=float, help="seconds between flushes that record finished shards")
    p.add_argument(
        "--dashboard",
        action="store_true",
        default=None,
        help="start the Ray dashboard with the local Ray this job starts (a cluster has its own)",
    )
    return p


def parse_config(argv: list[str] | None = None) -> BackfillConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    return load_settings(BackfillConfig, args, config_file)


def _init_ray(dashboard: bool = False) -> bool:
    """Connect to the cluster (ray job submit sets RAY_ADDRESS) or start a local Ray. True if we started it.

    A local Ray lives as long as the job: its dashboard only on request (measured here: 0.7-1.7 s of
    start-up on 2 cores, a sizeable share of an incremental run's fixed cost).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    local = {} if address else {"include_dashboard": dashboard}
    init_ray(address, logging_level=logging.WARNING, log_to_driver=True, **local)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return True


def run(cfg: BackfillConfig) -> dict[str, Any]:
    """Run one backfill; returns the summary (also written into the manifest)."""
    started = time.monotonic()
    started_at = datetime.now(timezone.utc)
    spec = DocumentSpec(cfg.id_field, tuple(cfg.text_fields), cfg.partition_by, cfg.partitions)
    plan = inspect_input(cfg.input, cfg.id_field, cfg.text_fields, cfg.partition_by)
    logger.info("input: %d JSONL and %d Parquet files", len(plan.jsonl_files), len(plan.parquet_files))
    source, model_identity = describe_model(cfg.model)
    # The backend is known now and must match an existing collection; the dtype is recorded once
    # the compute plan knows the device (_run_pipeline).
    model_identity = replace(model_identity, backend=cfg.backend)
    logger.info("model %s (%s), dimension %d", source.name, source.revision, model_identity.dimension)

    lite = LiteServer(cfg.milvus_uri) if is_lite_uri(cfg.milvus_uri) else contextlib.nullcontext(cfg.milvus_uri)
    with lite as uri:
        store = MilvusStore(uri, cfg.milvus_token)
        caps = store.capabilities
        note = caps.fallback_note(cfg.precision)
        if note:
            logger.warning(note)
        wanted = CollectionIdentity(
            model=model_identity.to_dict(),
            precision=cfg.precision,
            vector_type=caps.vector_type_for(cfg.precision),
            calibration=None,
            partitioning=spec.partitioning(),
            hnsw={"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction},
            rerank=RERANK_ENCODING if cfg.rerank else None,
        )
        exists = store.has_collection(cfg.collection)
        if exists:
            stored = store.check_identity(cfg.collection, wanted)
            wanted = replace(wanted, calibration=stored.calibration, vector_type=stored.vector_type, hnsw=stored.hnsw)
            logger.info("collection %r exists with a matching identity: reusing its int8 calibration", cfg.collection)
            cfg = fit_text_room(cfg, store)
        if cfg.write_mode == "bulk":
            bulk.check_bulk_ready(store, cfg.collection, exists, cfg.bulk_dir, cfg.bulk_storage_root)

        t_ray = time.monotonic()
        started_ray = _init_ray(cfg.dashboard)
        ray_start_seconds = time.monotonic() - t_ray
        try:
            summary = _run_pipeline(cfg, spec, plan, source, store, uri, wanted, exists, started)
            # Starting a local Ray (0 when joining one) is start-up that varies from run to run
            # (a retried start took 31 s here): reported apart so that benchmarks can take it out.
            summary["ray_start_seconds"] = round(ray_start_seconds, 3)
        finally:
            store.close()
            if started_ray:
                import ray

                ray.shutdown()
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary["docs_per_s"] = round(summary["read"] / summary["seconds"], 2) if summary["seconds"] else 0.0
    _write_manifest(cfg, summary, started_at)
    return summary


def fit_text_room(cfg: BackfillConfig, store: MilvusStore) -> BackfillConfig:
    """The stored text length for an existing collection: the one its text field was made with where
    --max-text-bytes was not given; a given one above it is refused before any work (Milvus would
    refuse every longer text at write time)."""
    room = store.varchar_max_length(cfg.collection, F_TEXT)
    if room is None:
        return cfg
    if "max_text_bytes" not in cfg.model_fields_set:
        return cfg.model_copy(update={"max_text_bytes": room})
    if cfg.max_text_bytes > room:
        raise ConfigError(
            f"max_text_bytes: collection {cfg.collection!r} stores texts of at most {room} bytes (its {F_TEXT!r} "
            f"field was made so), got {cfg.max_text_bytes}; use --max-text-bytes {room} or less, or a new --collection"
        )
    return cfg


def refuse_lite_on_cluster(milvus_uri: str, nodes: int) -> None:
    """The job's Lite server listens on this machine's loopback: actors on other nodes cannot reach it."""
    if is_lite_uri(milvus_uri) and nodes > 1:
        raise ConfigError(
            f"milvus_uri: the Milvus Lite file {milvus_uri!r} is served from this machine only, but the Ray "
            f"cluster has {nodes} nodes whose actors must write to it; use a Milvus server URI "
            "(http://host:19530) on a cluster"
        )


def _run_pipeline(cfg, spec, plan, source, store, uri, wanted, exists, started) -> dict[str, Any]:
    from jobs import pipeline

    shape = pipeline.cluster_shape()
    refuse_lite_on_cluster(cfg.milvus_uri, shape[2])
    compute = pipeline.plan_compute(
        cfg.actors,
        cfg.device,
        cfg.batch_size,
        cfg.writers,
        cfg.write_batch_rows,
        cfg.threads_per_actor,
        shape,
        actors_per_gpu=cfg.actors_per_gpu,
        dtype=cfg.dtype,
        backend=cfg.backend,
    )
    logger.info(
        "compute: %d %s actor(s) (%s, %s, %g GPU each), %d writer(s)",
        compute.actors,
        compute.device,
        compute.backend,
        compute.dtype,
        compute.gpus_per_actor,
        compute.writers,
    )
    if not exists:  # an existing collection keeps the identity it was made with
        model = {**wanted.model, "dtype": compute.dtype}
        if compute.dtype == "float32":
            del model["dtype"]
        wanted = replace(wanted, model=model)
    shard_bytes = cfg.shard_bytes or auto_shard_bytes(plan.total_bytes, compute.actors)
    log = _shard_log(cfg, spec, store, wanted) if exists else None
    todo, done = plan_shards(plan, shard_bytes, None if cfg.full else log)
    logger.info("%d shard(s) to read, %d already done (resume record %s)", len(todo), len(done), _state_path(cfg))
    # The whole input, skipped shards included: repeated ids across files, the input's document
    # count, and whether every shard can be read whole (deletes and moves act only then).
    t_census = time.monotonic()
    census = pipeline.take_census(todo + done, plan.filesystem, spec, plan.total_bytes)
    census_seconds = round(time.monotonic() - t_census, 3)
    duplicates = census.duplicates
    if duplicates:
        logger.warning("%d ids appear more than once in the input: every copy is rejected", len(duplicates))
    if census.failed:
        key, reason = next(iter(census.failed.items()))
        logger.error(
            "%d shard(s) of the input cannot be read whole, first %s (%s): nothing will be deleted and no "
            "document moved between partitions in this run",
            len(census.failed),
            key,
            reason,
        )
    docs = pipeline.read_documents(todo, plan.filesystem, spec, duplicates)

    calibration_info: dict[str, Any] = {}
    sample_clipped = 0  # values the sample itself clipped: its documents are written again below
    if cfg.precision == "int8" and not wanted.calibration:
        t = time.monotonic()
        rows = pipeline.read_sample(todo, plan.filesystem, spec, cfg.calibration_sample, duplicates)
        sample = pipeline.sample_embeddings(rows, source, compute)
        calibration = fit_int8(sample, cfg.int8_scheme, cfg.calibration_quantile)
        wanted = replace(wanted, calibration=calibration.to_json())
        calibration_info = {
            "sample_size": calibration.sample_size,
            "scheme": calibration.scheme,
            "quantile": calibration.quantile,
            "sample_clipped_fraction": calibration.clipped_fraction(sample),
            "seconds": round(time.monotonic() - t, 3),
        }
        sample_clipped = int(calibration.clipped_per_row(sample).sum())
        logger.info("int8 calibration fitted on %d documents", calibration.sample_size)
    if not exists:
        store.create_collection(cfg.collection, wanted, cfg.max_text_bytes)
        log = _shard_log(cfg, spec, store, wanted)
    if not spec.partition_by:
        names = (
            [DEFAULT_PARTITION] if spec.partitions <= 1 else [hash_partition_name(i) for i in range(spec.partitions)]
        )
        store.ensure_partitions(cfg.collection, names)

    embed_statuses = (*EMBED_STATUSES, S_UNCHANGED) if cfg.full else EMBED_STATUSES
    if exists:  # a new collection holds nothing to compare with
        docs = pipeline.detect_changes(
            docs,
            uri,
            cfg.milvus_token,
            cfg.collection,
            cfg.full,
            compute,
            allow_moves=census.complete,
            per_partition=bool(spec.partition_by),
        )
    vectors = pipeline.embed(
        docs, source, cfg.precision, wanted.calibration, compute, embed_statuses, rerank=bool(wanted.rerank)
    )
    staging = bulk.staging_dir(cfg.bulk_dir, cfg.collection) if cfg.write_mode == "bulk" else None
    if staging:
        results = pipeline.stage_bulk(
            vectors,
            uri,
            cfg.milvus_token,
            cfg.collection,
            cfg.max_text_bytes,
            str(staging),
            compute,
            cfg.bulk_file_rows,
        )
    else:
        results = pipeline.write(
            vectors,
            uri,
            cfg.milvus_token,
            cfg.collection,
            wanted.vector_type,
            cfg.max_text_bytes,
            compute,
            embed_statuses,
        )
    run_dir = _run_dir(cfg)
    # Staged rows are durable only once imported: with bulk, no shard is recorded before the import.
    interval = float("inf") if staging else cfg.checkpoint_interval_s
    progress = RunProgress(store, cfg.collection, log, todo, run_dir, interval)
    bulk_info = None
    try:
        progress.consume(pipeline.iter_summaries(results), started)
        if staging:
            bulk_info = bulk.import_staged(
                store,
                cfg.collection,
                progress.staged,
                staging,
                progress.written,
                cfg.bulk_storage_root,
                cfg.milvus_token,
            )
        progress.checkpoint()
    except Exception as exc:
        if not staging:
            progress.checkpoint()  # keep what finished: a rerun resumes from there
        raise _job_failure(exc, progress) from exc
    finally:
        progress.close()
    if census.failed:
        key, reason = next(iter(census.failed.items()))
        raise InputDataError(
            f"{reason}. {len(census.failed)} shard(s) of the input could not be read whole (first {key}): "
            f"nothing was deleted and no document moved; the {progress.recorded} shard(s) read in this run are "
            "written and recorded. Fix or remove the damaged file and rerun the same command"
        )
    deleted = 0
    if cfg.delete_missing:
        deleted = _delete_missing(cfg, plan, todo + done, census, log, store, uri)
    counts = progress.counts
    clipping = None
    if cfg.precision == "int8" and wanted.calibration:
        # Documents added after calibration: all of them when it was reused, the rest of the
        # corpus when it was fitted here (the sample's documents are re-embedded bit-identically).
        calibration = Int8Calibration.from_json(wanted.calibration)
        fitted_here = calibration.sample_size if calibration_info else 0
        after = max(0, progress.written - fitted_here)
        clipping = clipping_report(calibration, after, max(0, progress.clipped - sample_clipped))
        if clipping["drift"]:
            logger.warning(
                "int8 drift: %.2e of the values of %d documents added after calibration were clipped (more than "
                "%.0e): their distribution moved away from the %d-document sample the scale was fitted on; "
                "ranking degrades as clipping grows. Re-embed into a new --collection to fit a new scale.",
                clipping["clipped_fraction"],
                clipping["documents"],
                clipping["drift_threshold"],
                calibration.sample_size,
            )
    return {
        "read": progress.rows_read,
        "written": progress.written,
        "rejected": progress.rejected,
        "rejected_by_reason": dict(progress.reasons),
        "new": counts[S_NEW],
        "changed": counts[S_CHANGED] + counts[S_MOVED],
        "moved": counts[S_MOVED],
        "unchanged": counts[S_UNCHANGED],
        "deleted": deleted,
        "embedded": progress.written,
        "tokens_embedded": progress.tokens,
        "tokens_computed": progress.padded_tokens,
        # Share of the computed token positions that were padding, (computed - embedded) / computed.
        "padding_ratio": round(padding_ratio(progress.tokens, progress.padded_tokens), 4),
        "shards": {"total": len(todo) + len(done), "read": len(todo), "skipped": len(done), "bytes": shard_bytes},
        "collection": cfg.collection,
        "model": source.name,
        "model_revision": source.revision,
        "precision": cfg.precision,
        "vector_type": wanted.vector_type,
        "rerank": wanted.rerank,
        "milvus": store.capabilities.version,
        "partitions": dict(sorted(progress.per_partition.items())),
        "duplicate_ids": len(duplicates),
        # The whole input as read in this run (skipped shards included): what the collection must hold.
        "input": census.summary(),
        "census_seconds": census_seconds,
        "calibration": calibration_info or ("reused" if wanted.calibration else None),
        "write_mode": cfg.write_mode,
        "bulk_import": bulk_info,
        "int8_clipping": clipping,
        "int8_drift": bool(clipping and clipping["drift"]),
        "actors": compute.actors,
        "device": compute.device,
        "dtype": compute.dtype,
        "backend": compute.backend,
        "batch_size": compute.batch_size,
        "startup_seconds": round((progress.first_write_at or time.monotonic()) - started, 3),
        "run_dir": str(run_dir),
        "rejects_file": str(progress.rejects_path),
        "resume_record": str(_state_path(cfg)),
    }


def _state_path(cfg: BackfillConfig) -> Path:
    return Path(cfg.output_dir) / cfg.collection / STATE_FILE


def _shard_log(cfg: BackfillConfig, spec: DocumentSpec, store: MilvusStore, identity: CollectionIdentity) -> ShardLog:
    """The resume record, keyed by everything that decides what a shard's rows become."""
    key = run_key(
        {
            "collection": cfg.collection,
            "collection_id": store.collection_id(cfg.collection),
            "model": identity.model,
            "precision": identity.precision,
            "calibration": identity.calibration,
            "spec": [spec.id_field, list(spec.text_fields), spec.partition_by, spec.partitions],
            "max_text_bytes": cfg.max_text_bytes,
        }
    )
    return ShardLog(_state_path(cfg), key)


class RunProgress:
    """Aggregates the writers' summaries: counts, rejects, and shards seen whole.

    A shard is finished when as many of its rows came back (written, unchanged or rejected) as its
    end-of-shard marker says it has. Every `interval_s`, and at the end, finished shards are made
    durable: the rejects file is synced, Milvus is flushed, then the shards go into the resume
    record, in that order, so a recorded shard is never one whose writes a crash could still lose.
    """

    def __init__(
        self, store: MilvusStore, collection: str, log: ShardLog, shards: list[Shard], run_dir: Path, interval_s: float
    ) -> None:
        self.store, self.collection, self.log, self.interval_s = store, collection, log, interval_s
        self.shards = {s.key: s for s in shards}
        self.seen: Counter[str] = Counter()
        self.expected: dict[str, int] = {}
        self.finished: list[tuple[Shard, int]] = []  # complete, not yet flushed and recorded
        self.completed: set[str] = set()
        self.failed: dict[str, str] = {}  # shard -> why it could not be read
        self.deferred: set[str] = set()  # shards with a move deferred: complete, but never recorded as done
        self.recorded = 0
        self.counts: Counter[str] = Counter()
        self.per_partition: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.written = self.rejected = self.rows_read = 0
        self.clipped = 0  # int8 values clipped in the rows written
        self.staged: dict[str, list[str]] = defaultdict(list)  # bulk: partition -> Parquet files
        self.tokens = self.padded_tokens = 0  # real tokens embedded, token positions computed
        self.first_write_at: float | None = None
        self.last_checkpoint = time.monotonic()
        self.run_id = run_dir.name
        self.rejects_path = run_dir / "rejects.jsonl"
        self.rejects = open(self.rejects_path, "w")  # noqa: SIM115 (closed in close())

    def consume(self, batches, started: float) -> None:
        last_log = time.monotonic()
        for batch in batches:
            for kind, shard, part, count, written, doc_id, reason, raw, clipped, tokens, padded in zip(
                *(batch[c] for c in SUMMARY_COLUMNS), strict=True
            ):
                count = int(count)
                if kind == S_EOF:
                    self.expected[shard] = count
                elif kind == S_ERROR:
                    self.failed[shard] = str(reason)
                elif kind == bulk.KIND_STAGED:
                    self.staged[str(part)].extend(json.loads(raw))
                elif kind == S_REJECTED:
                    if reason == REASON_MOVE_DEFERRED:
                        self.deferred.add(shard)  # to do again: its shard must not count as done
                    self._seen(shard, 1)
                    self.rejected += 1
                    self.reasons[str(reason).split(":")[0]] += 1
                    record = {"id": doc_id, "source": self.shards[shard].path, "reason": reason, "raw": raw}
                    self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    self._seen(shard, count)
                    self.counts[kind] += count
                    if written:
                        self.first_write_at = self.first_write_at or time.monotonic()
                        self.written += int(written)
                        self.per_partition[str(part)] += int(written)
                        self.clipped += int(clipped)
                    self.tokens += int(tokens)
                    self.padded_tokens += int(padded)
                if shard in self.expected and self.seen[shard] == self.expected[shard]:
                    rows = self.expected.pop(shard)
                    if shard not in self.deferred:
                        self.finished.append((self.shards[shard], rows))
                    self.completed.add(shard)
            now = time.monotonic()
            if now - self.last_checkpoint > self.interval_s:
                self.checkpoint()
            if now - last_log > PROGRESS_EVERY_S:
                last_log = now
                logger.info(
                    "progress: %d/%d shards, %d read (%d new, %d changed, %d unchanged), %d written, "
                    "%d rejected, %.1f docs/s",
                    self.recorded + len(self.finished),
                    len(self.shards),
                    self.rows_read,
                    self.counts[S_NEW],
                    self.counts[S_CHANGED] + self.counts[S_MOVED],
                    self.counts[S_UNCHANGED],
                    self.written,
                    self.rejected,
                    self.rows_read / (now - started),
                )
        if self.failed:
            self.checkpoint()  # the shards that did finish are kept
            first = next(iter(self.failed.values()))
            raise InputDataError(
                f"{len(self.failed)} shard(s) could not be read, first {first}. The other "
                f"{self.recorded} shard(s) are finished and recorded; fix or remove the input and rerun "
                "the same command to resume"
            )
        incomplete = [k for k in self.shards if k not in self.completed]
        if incomplete:  # the stream ended, yet some shard's rows do not add up: never record it
            raise ReembedError(
                f"shard {incomplete[0]}: {self.seen[incomplete[0]]} rows came back of "
                f"{self.expected.get(incomplete[0], 'an unknown number')}; rerun to redo it"
            )

    def _seen(self, shard: str, n: int) -> None:
        self.seen[shard] += n
        self.rows_read += n

    def checkpoint(self) -> None:
        """Sync rejects, flush Milvus, then record the shards finished so far."""
        self.last_checkpoint = time.monotonic()
        if not self.finished:
            return
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        self.store.flush(self.collection)
        batch, self.finished = self.finished, []
        self.log.record(batch, self.run_id)
        self.recorded += len(batch)
        logger.info("checkpoint: %d shard(s) flushed and recorded (%d in all)", len(batch), self.recorded)

    def close(self) -> None:
        self.rejects.close()


def _job_failure(exc: Exception, progress: RunProgress) -> ReembedError:
    """The error to stop with. Its first line is the underlying exception (not Ray's wrapper or its
    retry advice) and where it came from: the shard it names, else the pipeline stage and the
    shards that were in flight; then what is kept."""
    if isinstance(exc, ReembedError):
        return exc
    cause = root_cause(exc)
    text = str(exc)
    match = re.search(r"shard (\S+#\d+-\d+)", cause) or re.search(r"shard (\S+#\d+-\d+)", text)
    stage = re.search(r"MapBatches\((\w+)\)", text)
    if match:
        where = f"shard {match.group(1)}"
    else:
        pending = [k for k in progress.shards if k not in progress.completed]
        where = f"{len(pending)} shard(s) in flight, first {pending[0]}" if pending else "after every shard was read"
    if stage:
        where += f", in {stage.group(1)}"
    err = InputDataError if match and "cannot read" in text else ReembedError
    return err(
        f"{cause} ({where}). {progress.recorded} shard(s) finished and recorded; "
        "rerun the same command to resume from there"
    )


def _delete_missing(cfg, plan, shards: list[Shard], census, log: ShardLog | None, store: MilvusStore, uri: str) -> int:
    """Delete the stored documents whose ids the input no longer names (after a flush).

    Acts only on a complete read of an unchanged input: the census read every shard whole
    (checked by the caller), no file changed size or mtime since it was planned, and the listing
    did not lose more than `max_delete_fraction` of the files the resume record knows (a listing
    that failed half-way must not read as "deleted"). The deletes themselves go through
    reembed.expr, whatever the ids hold.
    """
    from jobs import pipeline

    _refuse_changed_input(plan, shards)
    if log is not None:
        known = log.recorded_paths()
        lost = sorted(known - set(plan.files))
        if known and len(lost) > cfg.max_delete_fraction * len(known):
            raise InputDataError(
                f"delete_missing: {len(lost)} of the {len(known)} input files this collection was built from are "
                f"not in the listing of {cfg.input!r} (first {lost[0]!r}), more than "
                f"max_delete_fraction={cfg.max_delete_fraction}; nothing was deleted. If the listing is right "
                "(the files were removed on purpose), raise --max-delete-fraction"
            )
    if census.ids is not None:
        gone = [i for chunk in store.iter_ids(cfg.collection) for i in chunk if i not in census.ids]
    else:
        present = pipeline.input_ids(census.id_rows)
        stored = pipeline.stored_ids(uri, cfg.milvus_token, cfg.collection, store.list_partitions(cfg.collection))
        gone = pipeline.missing_ids(stored, present, plan.total_bytes)
    total = store.count(cfg.collection)
    if total and len(gone) > cfg.max_delete_fraction * total:
        raise ConfigError(
            f"delete_missing: {len(gone)} of {total} stored documents are not in the input, more than "
            f"max_delete_fraction={cfg.max_delete_fraction}; nothing was deleted. Check --input, or raise "
            "--max-delete-fraction if this is intended"
        )
    if gone:
        store.delete_ids(cfg.collection, gone)
        store.flush(cfg.collection)
        logger.info("deleted %d document(s) no longer in the input", len(gone))
    return len(gone)


def _refuse_changed_input(plan, shards: list[Shard]) -> None:
    """Raise if an input file changed (size or mtime) since the run planned its shards: the ids read
    then may no longer be the input's."""
    planned = {s.path: (s.size, s.mtime_ns) for s in shards}
    try:
        infos = plan.filesystem.get_file_info(list(planned))
    except Exception as exc:
        raise InputDataError(f"delete_missing: cannot stat the input files again: {exc}; nothing was deleted") from exc
    for info in infos:
        now = (int(info.size or 0), int(info.mtime_ns or 0))
        if info.type.name != "File" or now != planned[info.path]:
            raise InputDataError(
                f"delete_missing: input file {info.path!r} changed while the job ran ({planned[info.path]} -> {now} "
                "as (size, mtime_ns)); nothing was deleted. Rerun the same command"
            )


def _run_dir(cfg: BackfillConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = Path(cfg.output_dir) / cfg.collection / stamp
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_manifest(cfg: BackfillConfig, summary: dict[str, Any], started_at: datetime) -> None:
    manifest = {
        "started_at": started_at.isoformat(),
        "summary": summary,
        "config": cfg.model_dump(exclude={"milvus_token"}),
    }
    path = Path(summary["run_dir"]) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    summary["manifest"] = str(path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = parse_config(argv)
        summary = run(cfg)
    except ReembedError as exc:
        logger.error("%s", exc)
        print(json.dumps({"error": str(exc), "retriable": exc.retriable}), flush=True)
        return 2 if exc.is_input_error else 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
