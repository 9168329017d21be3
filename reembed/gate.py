"""The validation gate of a migration: is the new version fit to take the alias?

Sits between the build and the switch in `jobs/migrate.py`. On a golden query set (given as BEIR
queries + qrels, or sampled from the corpus: a document's title or first sentence, with that
document as the one relevant answer) it measures each version the way the service searches it
(the collection's own model, its int8 codes, one query per request, through reembed/search.py):

- `ann_recall@k`: the new collection's HNSW top k against exact search over its own stored
  vectors (streamed from Milvus, in the same code space); for a collection that keeps re-rank
  copies, its two-stage top k (codes, then floats) against exact search over those copies, so the
  check covers the candidates the first stage loses as well as the graph's misses;
- `ndcg@k` of both versions, when there are judgements (given, or the sampled source documents);
- `overlap@k`: share of the old top k the new one also returns. Two models legitimately differ,
  so this is reported, and checked only when a threshold is set;
- search latency p50/p95 (query embedding apart);
- rows: the new version against the input (always: a version missing documents never passes,
  and a count it cannot be checked against fails it too) and against the old version.

Each check but `rows_vs_input` has a threshold (None turns it off); the report names every failed
check with its value and its threshold.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from reembed.config import DEFAULT_RESCORE_MULTIPLIER
from reembed.errors import ConfigError, ModelMismatchError
from reembed.evaluation import SearchMode, percentile_ms, search_one_by_one, top_k_overlap
from reembed.inputs import list_input_files
from reembed.metrics import evaluate
from reembed.quantize import decode_rerank_vectors
from reembed.search import QueryCodec, load_query_model
from reembed.store import F_RERANK, F_VECTOR, CollectionIdentity, MilvusStore

logger = logging.getLogger(__name__)

# Documents read from the start of the corpus to sample golden queries from.
SAMPLE_POOL = 10_000
SAMPLED_QUERY_MAX_CHARS = 200
EXACT_BATCH_ROWS = 2_000


@dataclass(frozen=True)
class GateThresholds:
    """What the new version must reach; None turns a check off."""

    min_ann_recall: float | None = 0.95
    max_ndcg_drop: float | None = 0.02  # new nDCG >= old nDCG - this
    min_ndcg: float | None = None
    min_overlap: float | None = None
    max_search_p95_ms: float | None = 250.0
    max_row_diff: float | None = 0.0  # |new - old| / old rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GoldenQueries:
    """Query ids and texts, with judgements (qrels) where there are any."""

    ids: list[str]
    texts: list[str]
    qrels: dict[str, dict[str, int]]
    source: str  # "given" or "sampled"

    def __post_init__(self) -> None:
        if not self.ids:
            raise ConfigError("gate: the golden query set is empty")


@dataclass(frozen=True)
class ExpectedRows:
    """The rows a version must hold: the input's good unique documents, or None where unknown."""

    count: int | None
    note: str  # where the count comes from, or why it is unknown and what to do


def expected_rows_of(summary: dict[str, Any], recorded: int | None) -> ExpectedRows:
    """The rows a version built by this backfill run must hold.

    `summary` is the backfill job's; `recorded` is the count the version's record kept from an
    earlier run (None where none did, as in records written before the count was kept). A rerun
    skips the shards the resume record has, so this run's own read is no measure of the input:
    the summary's `input` section (counted over the whole input on every run) is; a summary
    without it gives `read - rejected` only when no shard was skipped, else the recorded count.
    An unknown count is returned as None, which fails the gate: a check dropped for want of a
    number is how a version missing documents passed on a plain rerun."""
    whole = summary.get("input")
    if isinstance(whole, dict):
        documents = whole.get("documents")
        if whole.get("complete") is False:
            return ExpectedRows(
                None,
                f"unknown: the input was not read whole this run (input.complete false, {documents} documents "
                "counted); rerun the build once every shard reads",
            )
        if isinstance(documents, int) and not isinstance(documents, bool) and documents >= 0:
            return ExpectedRows(documents, "the input's good unique documents, counted over the whole input")
        return ExpectedRows(None, f"unknown: the backfill summary's input.documents is {documents!r}, not a count")
    skipped = (summary.get("shards") or {}).get("skipped")
    if skipped == 0:
        return ExpectedRows(summary["read"] - summary["rejected"], "documents the job read, less its rejects")
    if recorded is not None:
        return ExpectedRows(recorded, f"kept in the version's record by an earlier run ({skipped} shards skipped now)")
    return ExpectedRows(
        None,
        f"unknown: this run skipped {skipped} shards read by an earlier run, and the version's record keeps no "
        "input document count (written before input_documents was kept); rebuild the version with a fresh "
        "--output-dir to count the whole input",
    )


def rows_vs_input_check(rows: int, expected: ExpectedRows) -> dict[str, Any]:
    """`rows_vs_input`: passes only when the version holds exactly the expected rows; fails where
    the expected count is unknown (fail closed), with the reason in its note."""
    if expected.count is None:
        return {
            "name": "rows_vs_input",
            "value": rows,
            "threshold": "== the input's documents (unknown)",
            "passed": False,
            "note": expected.note,
        }
    return {
        "name": "rows_vs_input",
        "value": rows,
        "threshold": f"== {expected.count}",
        "passed": rows == expected.count,
        "note": expected.note,
    }


def first_sentence(text: str, max_chars: int = SAMPLED_QUERY_MAX_CHARS) -> str:
    """The first sentence of `text`, cut at a word boundary within max_chars."""
    text = " ".join(text.split())
    match = re.search(r"(?<=[.!?])\s", text)
    sentence = text[: match.start()] if match else text
    if len(sentence) > max_chars:
        sentence = sentence[:max_chars].rsplit(" ", 1)[0]
    return sentence.strip()


def read_beir_queries(queries_path: str, qrels_path: str | None) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """BEIR queries.jsonl ({"_id", "text"}) and, optionally, a qrels TSV (query-id, corpus-id, score)."""
    queries: dict[str, str] = {}
    try:
        with open(queries_path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    queries[str(record["_id"])] = str(record["text"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"queries: cannot read BEIR queries from {queries_path!r} : {exc}") from exc
    qrels: dict[str, dict[str, int]] = {}
    if qrels_path:
        try:
            with open(qrels_path, encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh, delimiter="\t")
                header = next(reader, None)
                if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
                    raise ValueError(f"expected the header query-id, corpus-id, score; got {header!r}")
                for row in reader:
                    if row and int(row[2]) > 0:
                        qrels.setdefault(row[0], {})[row[1]] = int(row[2])
        except (OSError, ValueError, IndexError) as exc:
            raise ConfigError(f"qrels: cannot read {qrels_path!r}: {exc}") from exc
    return queries, qrels


def given_golden_queries(queries_path: str, qrels_path: str | None, limit: int, seed: int) -> GoldenQueries:
    """The given queries (those with judgements, where qrels are given), a seeded sample of `limit`."""
    queries, qrels = read_beir_queries(queries_path, qrels_path)
    ids = [q for q in queries if q in qrels] if qrels_path else list(queries)
    if qrels_path and not ids:
        raise ConfigError(f"qrels: none of the {len(qrels)} judged queries in {qrels_path!r} is in {queries_path!r}")
    if len(ids) > limit:
        ids = sorted(random.Random(seed).sample(ids, limit), key=ids.index)
    return GoldenQueries(ids, [queries[q] for q in ids], {q: qrels[q] for q in ids if q in qrels}, "given")


def _records(uri: str, limit: int) -> Iterable[dict[str, Any]]:
    """The first `limit` records of the input (JSONL lines that parse, Parquet rows)."""
    plan = list_input_files(uri)
    seen = 0
    for path in plan.files:
        if path in plan.parquet_files:
            with plan.filesystem.open_input_file(path) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024):
                    for record in batch.to_pylist():
                        yield record
                        seen += 1
                        if seen >= limit:
                            return
            continue
        with plan.filesystem.open_input_stream(path) as stream:
            for raw in stream.read().splitlines():
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
                    seen += 1
                    if seen >= limit:
                        return


def sampled_golden_queries(
    uri: str, id_field: str, text_fields: Sequence[str], n: int, seed: int, pool: int = SAMPLE_POOL
) -> GoldenQueries:
    """`n` documents drawn (seeded) from the first `pool` of the corpus; each gives a query (its first
    text field's first sentence: a title, where there is one) and is that query's one relevant answer."""
    candidates = []
    for record in _records(uri, pool):
        doc_id = record.get(id_field)
        text = next((record[f] for f in text_fields if isinstance(record.get(f), str) and record[f].strip()), None)
        if doc_id is None or text is None:
            continue
        query = first_sentence(text)
        if len(query.split()) >= 2:
            candidates.append((str(doc_id), query))
    if not candidates:
        raise ConfigError(f"gate: no document of {uri!r} gives a golden query (fields {list(text_fields)})")
    chosen = random.Random(seed).sample(candidates, min(n, len(candidates)))
    ids = [f"sample-{doc_id}" for doc_id, _ in chosen]
    return GoldenQueries(
        ids=ids,
        texts=[q for _, q in chosen],
        qrels={qid: {doc_id: 1} for qid, (doc_id, _) in zip(ids, chosen, strict=True)},
        source="sampled",
    )


def _as_matrix(vectors: list[Any]) -> np.ndarray:
    if vectors and isinstance(vectors[0], bytes | bytearray):  # INT8_VECTOR comes back as bytes
        return np.stack([np.frombuffer(v, dtype=np.int8) for v in vectors]).astype(np.float32)
    return np.asarray(vectors, dtype=np.float32)


def exact_top_k(
    store: MilvusStore,
    collection: str,
    query_vectors: np.ndarray,
    k: int,
    batches: Iterable[list[dict]] | None = None,
    rerank_dimension: int | None = None,
) -> list[list[str]]:
    """Exact top-k ids by inner product over every stored vector, streamed in batches.

    `query_vectors` (nq, d) are in the collection's search space (unit floats, or int8 codes: their
    inner products are exact integers in float32 for d up to 1024). With `rerank_dimension` the
    stored re-rank copies (float16) are compared with unit float queries instead of the codes.
    Ties keep the first-read row."""
    queries = np.asarray(query_vectors, dtype=np.float32)
    field = F_RERANK if rerank_dimension else F_VECTOR
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=object)
    for rows in batches if batches is not None else store.iter_rows(collection, [field], EXACT_BATCH_ROWS):
        ids = np.asarray([str(r["id"]) for r in rows], dtype=object)
        stored = [r[field] for r in rows]
        docs = decode_rerank_vectors(stored, rerank_dimension) if rerank_dimension else _as_matrix(stored)
        scores = queries @ docs.T  # both decoders give float32
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
    return [list(row) for row in best_ids]


@dataclass
class VersionMeasure:
    collection: str
    model: dict[str, Any]
    rows: int
    run: dict[str, list[str]]
    search_ms: list[float]
    embed_ms_per_query: float
    search_vectors: np.ndarray  # the queries in the space exact search compares them in
    rerank_dimension: int | None  # two-stage: exact search is over the re-rank copies

    def report(self, golden: GoldenQueries, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "collection": self.collection,
            "model": self.model.get("name"),
            "dimension": self.model.get("dimension"),
            "rows": self.rows,
            "two_stage": self.rerank_dimension is not None,
            "search_ms_p50": percentile_ms(self.search_ms, 50),
            "search_ms_p95": percentile_ms(self.search_ms, 95),
            "embed_ms_per_query": round(self.embed_ms_per_query, 3),
        }
        if golden.qrels:
            out.update({key: round(value, 4) for key, value in evaluate(self.run, golden.qrels, ks=(k,)).items()})
        return out


def measure_version(
    store: MilvusStore,
    collection: str,
    golden: GoldenQueries,
    k: int,
    ef: int,
    device: str = "cpu",
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
) -> VersionMeasure:
    """Embed the golden queries with the collection's own model (weights checked) and search them one
    by one as the service does: in two stages where the collection keeps re-rank copies."""
    identity: CollectionIdentity | None = store.read_identity(collection)
    if identity is None:
        raise ModelMismatchError(f"collection {collection!r} has no reembed identity: was it made by the job?")
    embedder = load_query_model(identity.model, device)
    t0 = time.perf_counter()
    floats = embedder.encode_queries(golden.texts)
    embed_ms = (time.perf_counter() - t0) * 1e3 / len(golden.texts)
    codec = QueryCodec(identity)
    store.load(collection)
    two_stage = bool(identity.rerank)
    mode = SearchMode(collection, collection, codec, ef, rescore_multiplier if two_stage else None)
    run, latencies = search_one_by_one(store, mode, floats, golden.ids, k)
    return VersionMeasure(
        collection=collection,
        model=identity.model,
        rows=store.count(collection),
        run=run,
        search_ms=latencies,
        embed_ms_per_query=embed_ms,
        search_vectors=floats if two_stage else codec.to_search_vectors(floats),
        rerank_dimension=int(identity.model["dimension"]) if two_stage else None,
    )


def _check(name: str, value: float | None, op: str, threshold: float | None, note: str = "") -> dict[str, Any]:
    if threshold is None:
        return {"name": name, "value": value, "threshold": None, "passed": None, "note": note or "check off"}
    if value is None:
        return {"name": name, "value": None, "threshold": f"{op} {threshold:g}", "passed": None, "note": note}
    passed = value >= threshold if op == ">=" else value <= threshold
    return {"name": name, "value": value, "threshold": f"{op} {threshold:g}", "passed": bool(passed), "note": note}


def run_gate(
    store: MilvusStore,
    new_collection: str,
    old_collection: str | None,
    golden: GoldenQueries,
    thresholds: GateThresholds,
    expected_rows: ExpectedRows,
    k: int = 10,
    ef: int = 64,
    device: str = "cpu",
    exact_max_rows: int = 1_000_000,
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
) -> dict[str, Any]:
    """Measure the new version (and the old one), check every threshold; returns the report.

    `report["passed"]` is False when any check that is on fails; `failed_checks` names each one
    with its value and threshold. Checks that cannot be measured (no old version, a collection
    over `exact_max_rows` for exact search) are reported with passed None and do not fail, except
    `rows_vs_input`, which fails where `expected_rows` is unknown."""
    started = time.monotonic()
    new = measure_version(store, new_collection, golden, k, ef, device, rescore_multiplier)
    old = measure_version(store, old_collection, golden, k, ef, device, rescore_multiplier) if old_collection else None
    new_report = new.report(golden, k)
    old_report = old.report(golden, k) if old else None

    checks = []
    if new.rows <= exact_max_rows:
        exact = exact_top_k(store, new_collection, new.search_vectors, k, rerank_dimension=new.rerank_dimension)
        recall = round(top_k_overlap(new.run, dict(zip(golden.ids, exact, strict=True)), k), 4)
        how = (
            f"two stages (k x {rescore_multiplier} by code, ef={ef}) vs exact over the re-rank copies"
            if new.rerank_dimension
            else f"HNSW ef={ef} vs exact"
        )
        checks.append(_check(f"ann_recall@{k}", recall, ">=", thresholds.min_ann_recall, how))
    else:
        note = f"not measured: over {exact_max_rows} rows"
        checks.append(_check(f"ann_recall@{k}", None, ">=", thresholds.min_ann_recall, note))
    ndcg_key = f"ndcg@{k}"
    if golden.qrels:
        judged = "given qrels" if golden.source == "given" else "sampled: the source document is the relevant one"
        if old_report is not None and thresholds.max_ndcg_drop is not None:
            floor = round(old_report[ndcg_key] - thresholds.max_ndcg_drop, 4)
            checks.append(
                _check(
                    ndcg_key,
                    new_report[ndcg_key],
                    ">=",
                    floor,
                    f"{judged}; old {old_report[ndcg_key]:.4f} - max drop {thresholds.max_ndcg_drop:g}",
                )
            )
        elif old_report is None:
            checks.append(_check(ndcg_key, new_report[ndcg_key], ">=", None, "no old version to compare with"))
        if thresholds.min_ndcg is not None:
            checks.append(_check(f"{ndcg_key} (absolute)", new_report[ndcg_key], ">=", thresholds.min_ndcg, judged))
    overlap = None
    if old is not None:
        overlap = round(top_k_overlap(new.run, old.run, k), 4)
        checks.append(_check(f"overlap@{k}", overlap, ">=", thresholds.min_overlap, "share of the old top k kept"))
    checks.append(_check("search_ms_p95", new_report["search_ms_p95"], "<=", thresholds.max_search_p95_ms))
    checks.append(rows_vs_input_check(new.rows, expected_rows))
    if old is not None:
        diff = round(abs(new.rows - old.rows) / max(1, old.rows), 6)
        checks.append(_check("rows_diff_vs_old", diff, "<=", thresholds.max_row_diff, f"{new.rows} vs {old.rows} rows"))
    failed = [c for c in checks if c["passed"] is False]
    return {
        "passed": not failed,
        "failed_checks": [f"{c['name']} = {c['value']}, wanted {c['threshold']}" for c in failed],
        "checks": checks,
        "new": new_report,
        "old": old_report,
        "overlap": overlap,
        "queries": {"count": len(golden.ids), "source": golden.source, "judged": bool(golden.qrels)},
        "k": k,
        "ef": ef,
        "rescore_multiplier": rescore_multiplier,
        "thresholds": thresholds.to_dict(),
        "seconds": round(time.monotonic() - started, 3),
    }


def format_gate(report: dict[str, Any]) -> str:
    """The gate as a person reads it: one line per check."""
    queries = report["queries"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"gate {verdict} ({queries['count']} {queries['source']} queries, k={report['k']})"]
    for c in report["checks"]:
        mark = {True: "ok", False: "FAIL", None: "-"}[c["passed"]]
        threshold = c["threshold"] or "off"
        lines.append(f"  {mark:4} {c['name']}: {c['value']} (wanted {threshold}) {c.get('note') or ''}".rstrip())
    return "\n".join(lines)
