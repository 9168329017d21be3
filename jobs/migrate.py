"""`python -m jobs.migrate`: move an alias to a new model without taking search offline.

    python -m jobs.migrate --alias docs --input corpus.jsonl --to-model all-mpnet-base-v2 [--switch]
    python -m jobs.migrate --alias docs --status | --rollback | --switch-to N | --drop N | --keep N

Blue-green: each version is its own collection, `<alias>_v<N>`, built by the backfill job
(`jobs.backfill.run`, so resumable and idempotent) while the alias keeps serving the current one.
A validation gate (reembed/gate.py) then measures the new version against the old on golden
queries; with --switch the alias moves in one `alter_alias` only if every check passed. On a new
alias the first version gets the alias when its gate passes. The records of every version (model,
dimension, precision, rows, the input's document count, build time, gate, state) live in Milvus
(reembed/versions.py), so --status and --rollback work from any machine. A version may keep float16
re-rank copies beside its codes (`--rerank`, or `--precision binary` on a server with BINARY_VECTOR):
the service and the gate then search it in two stages.

stdout: one JSON document (the last line). stderr: progress and the gate, one line a check.
Exit codes: 0 done, 1 a failure worth retrying (Milvus unreachable, ...), 2 bad input or flags
(nothing was done), 3 the gate failed (the alias did not move).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from typing import Any

from reembed.config import BackfillConfig, MigrateConfig, load_settings
from reembed.embedder import pick_device, resolve_model
from reembed.errors import ReembedError
from reembed.gate import (
    GateThresholds,
    GoldenQueries,
    expected_rows_of,
    format_gate,
    given_golden_queries,
    run_gate,
    sampled_golden_queries,
)
from reembed.inputs import inspect_input
from reembed.lite import LiteServer, is_lite_uri
from reembed.store import MilvusStore
from reembed.versions import (
    BUILDING,
    FAILED,
    READY,
    VersionRecord,
    VersionRegistry,
    now_iso,
    version_collection,
)

logger = logging.getLogger("jobs.migrate")

EXIT_GATE_FAILED = 3
# The parts of the backfill's summary kept in a version's record.
SUMMARY_KEPT = (
    "read",
    "written",
    "rejected",
    "new",
    "changed",
    "unchanged",
    "seconds",
    "startup_seconds",
    "docs_per_s",
    "vector_type",
    "int8_drift",
    "shards",
    "input",
    "manifest",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.migrate", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="JSON, TOML or YAML file of settings (flags override it)")
    p.add_argument("--alias", help="the alias the service queries; versions are <alias>_v<N>")
    p.add_argument("--input", help="corpus to build the next version from (as jobs.backfill reads it)")
    p.add_argument("--to-model", help="hub name or local folder of the next version's model")
    p.add_argument("--precision", choices=["int8", "float32", "binary"], help="of the new version (default int8)")
    p.add_argument(
        "--rerank",
        action="store_true",
        default=None,
        help="the new version keeps float16 re-rank copies: searched in two stages (binary always does)",
    )
    p.add_argument("--milvus-uri", help="Milvus URI or a Milvus Lite .db path (default ./data/reembed.db)")
    p.add_argument("--milvus-token")
    p.add_argument("--registry", help="collection of version records (default reembed_versions)")
    actions = p.add_argument_group("actions (one a run; default: build the next version)")
    actions.add_argument("--switch", action="store_true", default=None, help="move the alias if the gate passes")
    actions.add_argument("--status", action="store_true", default=None, help="print the alias and its versions")
    actions.add_argument("--rollback", action="store_true", default=None, help="alias back to the previous version")
    actions.add_argument("--switch-to", type=int, metavar="N", help="point the alias at built version N")
    actions.add_argument("--drop", type=int, metavar="N", help="drop version N (never the alias or rollback target)")
    actions.add_argument("--keep", type=int, metavar="N", help="drop all but the newest N versions (after a switch)")
    gate = p.add_argument_group("validation gate (a threshold of 'off' turns a check off)")
    gate.add_argument("--queries", help="BEIR queries.jsonl (default: sampled from the corpus)")
    gate.add_argument("--qrels", help="BEIR qrels TSV for nDCG")
    gate.add_argument("--gate-queries", type=int, help="golden queries used (default 100)")
    gate.add_argument("--gate-seed", type=int)
    gate.add_argument("--gate-k", type=int, help="top k compared (default 10)")
    gate.add_argument("--gate-ef", type=int, help="HNSW ef of the gate's searches (default 64)")
    gate.add_argument(
        "--gate-rescore-multiplier", type=int, help="two-stage versions: candidates per result (default 10)"
    )
    for flag, default in (
        ("--gate-min-ann-recall", "0.95"),
        ("--gate-max-ndcg-drop", "0.02"),
        ("--gate-min-ndcg", "off"),
        ("--gate-min-overlap", "off"),
        ("--gate-max-search-p95-ms", "250"),
        ("--gate-max-row-diff", "0 (fraction of the old version's rows)"),
    ):
        gate.add_argument(flag, type=_threshold, help=f"default {default}")
    gate.add_argument("--gate-exact-max-rows", type=int, help="measure ann recall up to this many rows")
    job = p.add_argument_group("the backfill job that builds a version (see python -m jobs.backfill -h)")
    job.add_argument("--id-field")
    job.add_argument("--text-fields")
    job.add_argument("--partition-by")
    job.add_argument("--partitions", type=int)
    job.add_argument("--device", choices=["auto", "cpu", "cuda"])
    job.add_argument("--int8-scheme", choices=["global", "per-dim"])
    job.add_argument("--calibration-sample", type=int)
    job.add_argument("--calibration-quantile", type=float)
    job.add_argument("--hnsw-m", type=int)
    job.add_argument("--hnsw-ef-construction", type=int)
    job.add_argument("--actors", type=int)
    job.add_argument("--threads-per-actor", type=int)
    job.add_argument("--batch-size", type=int)
    job.add_argument("--writers", type=int)
    job.add_argument("--max-text-bytes", type=int)
    job.add_argument("--output-dir")
    return p


_OFF = object()


def _threshold(text: str) -> float | object:
    if text.strip().lower() in ("off", "none"):
        return _OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def parse_config(argv: list[str] | None = None) -> MigrateConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    off = [name for name, value in args.items() if value is _OFF]
    flags = {name: value for name, value in args.items() if value is not _OFF}
    cfg = load_settings(MigrateConfig, flags, config_file)
    return cfg.model_copy(update=dict.fromkeys(off)) if off else cfg


def thresholds_of(cfg: MigrateConfig) -> GateThresholds:
    return GateThresholds(
        min_ann_recall=cfg.gate_min_ann_recall,
        max_ndcg_drop=cfg.gate_max_ndcg_drop,
        min_ndcg=cfg.gate_min_ndcg,
        min_overlap=cfg.gate_min_overlap,
        max_search_p95_ms=cfg.gate_max_search_p95_ms,
        max_row_diff=cfg.gate_max_row_diff,
    )


def golden_queries(cfg: MigrateConfig) -> GoldenQueries:
    if cfg.queries:
        return given_golden_queries(cfg.queries, cfg.qrels, cfg.gate_queries, cfg.gate_seed)
    assert cfg.input is not None
    return sampled_golden_queries(cfg.input, cfg.id_field, cfg.text_fields, cfg.gate_queries, cfg.gate_seed)


def _resumable(versions: dict[int, VersionRecord], model: str, precision: str, rerank: bool) -> int | None:
    """The newest version, if it is an unfinished or failed build of the same model, precision and
    re-rank copies: building it again resumes the job there (it skips what is already written)."""
    if not versions:
        return None
    newest = versions[max(versions)]
    same = (newest.model, newest.precision, newest.rerank) == (model, precision, rerank)
    if newest.state in (BUILDING, FAILED) and same:
        return newest.version
    return None


def run(cfg: MigrateConfig) -> tuple[dict[str, Any], int]:
    """Carry out the action; returns (the JSON document to print, the exit code)."""
    prepared = _prepare_build(cfg) if cfg.action == "build" else None
    server = LiteServer(cfg.milvus_uri) if is_lite_uri(cfg.milvus_uri) else contextlib.nullcontext(cfg.milvus_uri)
    with server as uri:
        store = MilvusStore(uri, cfg.milvus_token)
        try:
            registry = VersionRegistry(store, cfg.registry)
            registry.ensure()
            if prepared is not None:
                return build(cfg, store, registry, uri, *prepared)
            if cfg.action == "rollback":
                registry.rollback(cfg.alias)
            elif cfg.action == "switch_to":
                assert cfg.switch_to is not None
                registry.switch(cfg.alias, cfg.switch_to)
            elif cfg.action == "drop":
                assert cfg.drop is not None
                registry.drop(cfg.alias, cfg.drop)
            elif cfg.action == "keep":
                assert cfg.keep is not None
                dropped = registry.retain(cfg.alias, cfg.keep)
                return {"dropped": dropped, **registry.status(cfg.alias)}, 0
            return registry.status(cfg.alias), 0
        finally:
            store.close()


def _prepare_build(cfg: MigrateConfig) -> tuple[str, GoldenQueries]:
    """Everything a build needs that can be checked before Milvus is touched: the input, the model,
    the golden queries. A bad flag fails here, before any record is written."""
    assert cfg.input is not None and cfg.to_model is not None
    inspect_input(cfg.input, cfg.id_field, cfg.text_fields, cfg.partition_by)
    source = resolve_model(cfg.to_model)
    load_settings(BackfillConfig, cfg.backfill_settings("check", cfg.milvus_uri))  # the job's own validation
    return source.name, golden_queries(cfg)


def build(
    cfg: MigrateConfig, store: MilvusStore, registry: VersionRegistry, uri: str, model: str, golden: GoldenQueries
) -> tuple[dict[str, Any], int]:
    """Build the next version with the backfill job, gate it, and switch the alias if asked and passed."""
    from jobs.backfill import run as run_backfill

    # Binary codes need a BINARY_VECTOR field: refused here, before a version record is written.
    store.capabilities.vector_type_for(cfg.precision)
    alias_record, versions = registry.sync(cfg.alias)
    current = versions.get(alias_record.target) if alias_record.target is not None else None
    number = _resumable(versions, model, cfg.precision, cfg.rerank)
    if number is None:
        number = registry.next_version(cfg.alias)
    collection = version_collection(cfg.alias, number)
    record = versions.get(number) or VersionRecord(
        alias=cfg.alias,
        version=number,
        collection=collection,
        state=BUILDING,
        model=model,
        precision=cfg.precision,
        rerank=cfg.rerank,
    )
    resumed = record.started_at is not None
    record.state, record.started_at, record.finished_at = BUILDING, record.started_at or now_iso(), None
    record.error, record.gate = None, None
    registry.put_version(record)
    logger.info(
        "%s version %d (%s) with %s, %s%s; %s keeps serving",
        "resuming" if resumed else "building",
        number,
        collection,
        model,
        cfg.precision,
        " + re-rank copies" if cfg.rerank else "",
        current.collection if current else "nothing",
    )

    started = time.monotonic()
    try:
        summary = run_backfill(BackfillConfig(**cfg.backfill_settings(collection, uri)))
    except Exception as exc:
        record.state, record.error, record.finished_at = FAILED, f"build: {exc}", now_iso()
        with contextlib.suppress(ReembedError):  # the build's own error is the one to report
            registry.put_version(record)
        raise
    identity = store.read_identity(collection)
    # A resumed build adds this run's time to the earlier runs'.
    record.build_seconds = round((record.build_seconds or 0.0) + time.monotonic() - started, 3)
    record.model_identity = identity.model if identity else {}
    record.rows = store.count(collection)
    record.backfill = {key: summary.get(key) for key in SUMMARY_KEPT}
    # Always checked, never dropped: a rerun skips the shards an earlier run recorded, so the count
    # comes from the summary's whole-input section or the record, and an unknown one fails the gate.
    expected = expected_rows_of(summary, record.input_documents)
    record.input_documents = expected.count
    registry.put_version(record)  # still `building` until the gate says otherwise

    report = run_gate(
        store,
        collection,
        current.collection if current else None,
        golden,
        thresholds_of(cfg),
        k=cfg.gate_k,
        ef=cfg.gate_ef,
        rescore_multiplier=cfg.gate_rescore_multiplier,
        device=pick_device(cfg.device),
        expected_rows=expected,
        exact_max_rows=cfg.gate_exact_max_rows,
    )
    logger.info("%s", format_gate(report))
    record.gate = report
    record.finished_at = now_iso()
    record.state = READY if report["passed"] else FAILED
    record.error = None if report["passed"] else "gate: " + "; ".join(report["failed_checks"])
    registry.put_version(record)

    switched = False
    if report["passed"] and (cfg.switch or current is None):
        registry.switch(cfg.alias, number)
        switched = True
    elif not report["passed"]:
        logger.error(
            "gate failed, the alias stays on %s: %s",
            current.collection if current else "nothing",
            "; ".join(report["failed_checks"]),
        )
    dropped = registry.retain(cfg.alias, cfg.keep) if cfg.keep is not None and switched else []
    status = registry.status(cfg.alias)
    result = {
        "alias": cfg.alias,
        "version": number,
        "collection": collection,
        "model": record.model_identity.get("name", model),
        "dimension": record.model_identity.get("dimension"),
        "precision": cfg.precision,
        "rerank": cfg.rerank,
        "rows": record.rows,
        "input_documents": record.input_documents,
        "build_seconds": record.build_seconds,
        "resumed": resumed,
        "gate": report,
        "passed": report["passed"],
        "switched": switched,
        "alias_target": status["target"],
        "previous": current.collection if current else None,
        "dropped": dropped,
        "backfill": record.backfill,
    }
    return result, 0 if report["passed"] else EXIT_GATE_FAILED


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = parse_config(argv)
        result, code = run(cfg)
    except ReembedError as exc:
        logger.error("%s", exc)
        print(json.dumps({"error": str(exc), "retriable": exc.retriable}), flush=True)
        return 2 if exc.is_input_error else 1
    print(json.dumps(result, default=str), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
