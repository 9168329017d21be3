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
import sys
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reembed.config import BackfillConfig, load_settings
from reembed.documents import DocumentSpec, hash_partition_name
from reembed.embedder import describe_model
from reembed.errors import ConfigError, ReembedError
from reembed.inputs import inspect_input
from reembed.lite import LiteServer, is_lite_uri
from reembed.quantize import Int8Calibration, clipping_report, fit_int8
from reembed.store import DEFAULT_PARTITION, CollectionIdentity, MilvusStore

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
    p.add_argument("--precision", choices=["int8", "float32"])
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
    p.add_argument("--batch-size", type=int, help="texts per model forward pass")
    p.add_argument("--writers", type=int, help="writer actors")
    p.add_argument("--write-batch-rows", type=int, help="rows per upsert request (before the byte cap)")
    p.add_argument("--max-text-bytes", type=int, help="stored text is cut to this many UTF-8 bytes")
    p.add_argument("--output-dir", help="where run manifests and rejects go (default ./data/runs)")
    return p


def parse_config(argv: list[str] | None = None) -> BackfillConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    return load_settings(BackfillConfig, args, config_file)


def _init_ray() -> bool:
    """Connect to the cluster (ray job submit sets RAY_ADDRESS) or start a local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=True)
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
        )
        exists = store.has_collection(cfg.collection)
        if exists:
            stored = store.check_identity(cfg.collection, wanted)
            wanted = replace(wanted, calibration=stored.calibration, vector_type=stored.vector_type, hnsw=stored.hnsw)
            logger.info("collection %r exists with a matching identity: reusing its int8 calibration", cfg.collection)

        started_ray = _init_ray()
        try:
            summary = _run_pipeline(cfg, spec, plan, source, store, uri, wanted, exists, started)
        finally:
            store.close()
            if started_ray:
                import ray

                ray.shutdown()
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary["docs_per_s"] = round(summary["read"] / summary["seconds"], 2) if summary["seconds"] else 0.0
    _write_manifest(cfg, summary, started_at)
    return summary


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
        cfg.actors, cfg.device, cfg.batch_size, cfg.writers, cfg.write_batch_rows, cfg.threads_per_actor, shape
    )
    logger.info("compute: %d %s actor(s), %d writer(s)", compute.actors, compute.device, compute.writers)
    duplicates = pipeline.count_duplicate_ids(pipeline.read_documents(plan, spec), plan.total_bytes)
    if duplicates:
        logger.warning("%d ids appear more than once in the input: every copy is rejected", len(duplicates))
    docs = pipeline.read_documents(plan, spec, duplicates)

    calibration_info: dict[str, Any] = {}
    sample_clipped = 0  # values the sample itself clipped: its documents are written again below
    if cfg.precision == "int8" and not wanted.calibration:
        t = time.monotonic()
        sample = pipeline.sample_embeddings(docs, cfg.calibration_sample, source, compute)
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
    if not spec.partition_by:
        names = (
            [DEFAULT_PARTITION] if spec.partitions <= 1 else [hash_partition_name(i) for i in range(spec.partitions)]
        )
        store.ensure_partitions(cfg.collection, names)

    vectors = pipeline.embed(docs, source, cfg.precision, wanted.calibration, compute)
    results = pipeline.write(
        vectors,
        uri,
        cfg.milvus_token,
        cfg.collection,
        wanted.vector_type,
        cfg.max_text_bytes,
        bool(spec.partition_by),
        compute,
    )
    run_dir = _run_dir(cfg)
    rejects_path = run_dir / "rejects.jsonl"
    per_partition: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    rejected = 0
    clipped = 0
    first_write_at = None
    last_log = time.monotonic()
    with open(rejects_path, "w") as rejects:
        for batch in pipeline.iter_summaries(results):
            for kind, part, count, doc_id, src, reason, raw, n_clipped in zip(
                batch["kind"],
                batch["partition"],
                batch["count"],
                batch["id"],
                batch["source"],
                batch["reason"],
                batch["raw"],
                batch["clipped"],
                strict=True,
            ):
                if kind == "written":
                    first_write_at = first_write_at or time.monotonic()
                    per_partition[str(part)] += int(count)
                    clipped += int(n_clipped)
                else:
                    rejected += 1
                    reasons[str(reason).split(":")[0]] += 1
                    rejects.write(
                        json.dumps({"id": doc_id, "source": src, "reason": reason, "raw": raw}, ensure_ascii=False)
                        + "\n"
                    )
            if time.monotonic() - last_log > PROGRESS_EVERY_S:
                last_log = time.monotonic()
                done = sum(per_partition.values())
                logger.info(
                    "progress: %d written, %d rejected, %.1f docs/s", done, rejected, done / (last_log - started)
                )
    store.flush(cfg.collection)
    written = sum(per_partition.values())
    clipping = None
    if cfg.precision == "int8" and wanted.calibration:
        # Documents added after calibration: all of them when it was reused, the rest of the
        # corpus when it was fitted here (the sample's documents are re-embedded bit-identically).
        calibration = Int8Calibration.from_json(wanted.calibration)
        fitted_here = calibration.sample_size if calibration_info else 0
        clipping = clipping_report(calibration, max(0, written - fitted_here), max(0, clipped - sample_clipped))
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
        "read": written + rejected,
        "written": written,
        "rejected": rejected,
        "rejected_by_reason": dict(reasons),
        "collection": cfg.collection,
        "model": source.name,
        "model_revision": source.revision,
        "precision": cfg.precision,
        "vector_type": wanted.vector_type,
        "milvus": store.capabilities.version,
        "partitions": dict(sorted(per_partition.items())),
        "duplicate_ids": len(duplicates),
        "calibration": calibration_info or ("reused" if wanted.calibration else None),
        "int8_clipping": clipping,
        "int8_drift": bool(clipping and clipping["drift"]),
        "actors": compute.actors,
        "device": compute.device,
        "startup_seconds": round((first_write_at or time.monotonic()) - started, 3),
        "run_dir": str(run_dir),
        "rejects_file": str(rejects_path),
    }


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
