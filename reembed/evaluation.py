"""Retrieval quality through the pipeline: precisions side by side, two-stage search, an HNSW sweep.

Beside the flow, at its end. `jobs/evaluate.py` backfills a BEIR corpus with the real job (float32
vectors) and takes it from there with the pieces here, without embedding a document again:

- `read_stored_corpus` reads the job's vectors back from Milvus, in corpus order;
- `write_encoded_collection` stores the same documents under another encoding (int8 codes or
  binary sign bits, with float16 re-rank copies beside them), with the job's identity otherwise;
- `SearchMode` searches one collection through reembed/search.py (the service's path) and
  `evaluate_mode` scores it: one query per request at k=10 (rankings and latency), in batches at
  depth 100;
- `in_memory_rankings` ranks the same encodings exactly in memory, so that what the encoding
  loses and what the index loses can be told apart;
- `hnsw_sweep_point` builds one HNSW index and measures ANN recall against exact search, build
  time, search latency and memory; `plot_sweep` draws recall against latency.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from reembed.errors import ReembedError
from reembed.metrics import evaluate, exact_search, hamming_search, rescore
from reembed.quantize import RERANK_ENCODING, Int8Calibration, binarize, encode_rerank_vectors, rerank_text_bytes
from reembed.search import QueryCodec, search_collection, search_reranked
from reembed.store import (
    F_HASH,
    F_ID,
    F_PARTITION,
    F_RERANK,
    F_TEXT,
    F_VECTOR,
    CollectionIdentity,
    MilvusStore,
    vector_payload,
)

logger = logging.getLogger(__name__)

TOP_K = 10
DEPTH = 100
TABLE_METRICS = (f"ndcg@{TOP_K}", f"recall@{TOP_K}", f"recall@{DEPTH}", f"mrr@{TOP_K}")
REFERENCE = "float32"
MODES = ("float32", "int8", "binary+rerank", "int8+rerank")
# First searches on a fresh connection pay for channel set-up; they are not timed.
WARMUP_QUERIES = 5
# Stored text of the sweep's collections: the index is what is measured, not the documents.
SWEEP_TEXT_BYTES = 256


@dataclass(frozen=True)
class StoredCorpus:
    """The documents a collection holds, in corpus order: ids, float32 vectors (n, d), other fields."""

    ids: list[str]
    floats: np.ndarray
    fields: list[dict[str, str]]  # F_TEXT, F_HASH, F_PARTITION of each document

    @property
    def dimension(self) -> int:
        return int(self.floats.shape[1])


def read_stored_corpus(store: MilvusStore, collection: str, ids: Sequence[str]) -> StoredCorpus:
    """The rows of `collection` with these ids, in this order; ids it lacks (rejects) are left out."""
    rows = store.fetch(collection, ids, [F_VECTOR, F_TEXT, F_HASH, F_PARTITION])
    by_id = {str(r[F_ID]): r for r in rows}
    present = [i for i in ids if i in by_id]
    if not present:
        raise ValueError(f"collection {collection!r} holds none of the {len(ids)} corpus ids")
    floats = np.asarray([by_id[i][F_VECTOR] for i in present], dtype=np.float32)
    fields = [{f: by_id[i][f] for f in (F_TEXT, F_HASH, F_PARTITION)} for i in present]
    return StoredCorpus(ids=present, floats=floats, fields=fields)


def encoded_identity(
    base: CollectionIdentity, precision: str, vector_type: str, calibration: Int8Calibration | None
) -> CollectionIdentity:
    """The job's identity with another encoding of the same vectors, keeping float16 re-rank copies."""
    return replace(
        base,
        precision=precision,
        vector_type=vector_type,
        calibration=calibration.to_json() if calibration else None,
        rerank=RERANK_ENCODING,
    )


def write_encoded_collection(
    store: MilvusStore,
    name: str,
    identity: CollectionIdentity,
    corpus: StoredCorpus,
    codes: np.ndarray,
    max_text_bytes: int,
    keep_text: bool = True,
    build_index: bool = True,
) -> None:
    """Create `name` and upsert the corpus into it with `codes` as its vectors (float32 (n, d), int8
    (n, d) or packed bits uint8 (n, d/8)), plus re-rank copies where the identity keeps them."""
    store.create_collection(name, identity, max_text_bytes, build_index=build_index)
    payload = vector_payload(codes, identity.vector_type)
    copies = encode_rerank_vectors(corpus.floats) if identity.rerank else None
    by_partition: dict[str, list[int]] = defaultdict(list)
    for i, fields in enumerate(corpus.fields):
        by_partition[fields[F_PARTITION]].append(i)
    store.ensure_partitions(name, by_partition)
    for partition, rows in by_partition.items():
        batch = []
        for i in rows:
            row: dict[str, Any] = {
                F_ID: corpus.ids[i],
                F_VECTOR: payload[i],
                F_TEXT: corpus.fields[i][F_TEXT] if keep_text else "",
                F_HASH: corpus.fields[i][F_HASH],
                F_PARTITION: partition,
            }
            if copies is not None:
                row[F_RERANK] = copies[i]
            batch.append(row)
        store.upsert(name, partition, batch)
    store.flush(name)


def load_indexed(store: MilvusStore, name: str) -> dict[str, Any]:
    """Wait until every row of `name` is indexed, then (re)load it, so searches use the index.

    A server searches segments whose index is still being built another way (brute force or an
    interim index), which would blur what is measured. Returns the index description."""
    desc = store.wait_for_index(name)
    store.release(name)
    store.load(name)
    return desc


def bytes_per_vector(mode: str, dimension: int, vector_type: str) -> dict[str, int]:
    """What one vector costs in `mode`: the codes the first stage searches, the re-rank copies it
    keeps, their sum (`bytes_per_vector`), and what this server really stores for them (int8
    codes in a FLOAT_VECTOR field take 4 bytes each where there is no INT8_VECTOR)."""
    code = {"float32": 4 * dimension, "int8": dimension, "binary": dimension // 8}[mode.split("+")[0]]
    rerank = rerank_text_bytes(dimension) if mode.endswith("+rerank") else 0
    stored = {"FLOAT_VECTOR": 4 * dimension, "INT8_VECTOR": dimension, "BINARY_VECTOR": dimension // 8}[vector_type]
    return {
        "bytes_per_vector": code + rerank,
        "code_bytes_per_vector": code,
        "rerank_bytes_per_vector": rerank,
        "stored_bytes_per_vector": stored + rerank,
    }


@dataclass(frozen=True)
class SearchMode:
    """One precision as the service would search it: a collection, its query codec, and either one
    stage or two (first stage over codes, float re-ranking of k * rescore_multiplier)."""

    name: str
    collection: str
    codec: QueryCodec
    ef: int
    rescore_multiplier: int | None = None

    def search(self, store: MilvusStore, query_floats: np.ndarray, k: int) -> list[list[str]]:
        """Ids of the top k documents for each unit float32 query (nq, d), best first."""
        if self.rescore_multiplier:
            hits = search_reranked(
                store, self.collection, self.codec, query_floats, k, self.ef, self.rescore_multiplier, output_fields=()
            )
        else:
            vectors = self.codec.to_search_vectors(query_floats)
            hits = search_collection(
                store, self.collection, vectors, self.codec.identity.vector_type, k, self.ef, output_fields=()
            )
        return [[h.id for h in row] for row in hits]


def percentile_ms(samples: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples), q)), 3) if samples else 0.0


def top_k_overlap(run: Mapping[str, Sequence[str]], reference: Mapping[str, Sequence[str]], k: int) -> float:
    """Mean share of each query's reference top k found in the run's top k (ANN recall@k)."""
    shares = [len(set(run.get(q, ())[:k]) & set(ref[:k])) / max(1, len(ref[:k])) for q, ref in reference.items()]
    return float(np.mean(shares)) if shares else 0.0


def search_one_by_one(
    store: MilvusStore, mode: SearchMode, query_floats: np.ndarray, query_ids: Sequence[str], k: int
) -> tuple[dict[str, list[str]], list[float]]:
    """Each query alone, as a service request: (query id -> top-k ids, search ms of each query).
    The first few searches warm the connection up and are not timed."""
    for i in range(min(WARMUP_QUERIES, len(query_ids))):
        mode.search(store, query_floats[i : i + 1], k)
    run: dict[str, list[str]] = {}
    latencies: list[float] = []
    for i, qid in enumerate(query_ids):
        t0 = time.perf_counter()
        run[qid] = mode.search(store, query_floats[i : i + 1], k)[0]
        latencies.append((time.perf_counter() - t0) * 1e3)
    return run, latencies


def evaluate_mode(
    store: MilvusStore,
    mode: SearchMode,
    query_floats: np.ndarray,
    query_ids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    exact_top: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Quality and latency of one mode: every query alone at k=10 (as a service request: its
    ranking and its search time), then all of them in batches at depth 100 for recall@100."""
    run_k, latencies = search_one_by_one(store, mode, query_floats, query_ids, TOP_K)
    t0 = time.perf_counter()
    run_depth = dict(zip(query_ids, mode.search(store, query_floats, DEPTH), strict=True))
    depth_s = time.perf_counter() - t0
    metrics = {**evaluate(run_k, qrels, ks=(TOP_K,)), **evaluate(run_depth, qrels, ks=(DEPTH,))}
    return {
        **{key: round(value, 4) for key, value in metrics.items()},
        "search_ms_p50": percentile_ms(latencies, 50),
        "search_ms_p95": percentile_ms(latencies, 95),
        f"depth{DEPTH}_batch_s": round(depth_s, 3),
        f"top{TOP_K}_overlap_with_exact": round(top_k_overlap(run_k, exact_top, TOP_K), 4),
    }


def in_memory_rankings(
    query_floats: np.ndarray,
    doc_floats: np.ndarray,
    calibration: Int8Calibration,
    rescore_multiplier: int,
    k: int,
    modes: Sequence[str] = MODES,
) -> dict[str, np.ndarray]:
    """Exact rankings (document indices (nq, k)) of each mode's encoding, as the Milvus path ranks
    them: int8 by the integer inner product of codes, binary by Hamming distance, re-ranking by the
    float query against float16 copies of the documents."""
    copies = doc_floats.astype(np.float16).astype(np.float32)
    q_codes, d_codes = calibration.quantize(query_floats), calibration.quantize(doc_floats)
    depth = k * rescore_multiplier
    rankers = {
        "float32": lambda: exact_search(query_floats, doc_floats, k),
        "int8": lambda: exact_search(q_codes, d_codes, k),
        "binary+rerank": lambda: rescore(
            query_floats, copies, hamming_search(binarize(query_floats), binarize(doc_floats), depth), k
        ),
        "int8+rerank": lambda: rescore(query_floats, copies, exact_search(q_codes, d_codes, depth), k),
    }
    return {mode: rankers[mode]() for mode in modes}


def run_from_indices(indices: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str]) -> dict[str, list[str]]:
    return {qid: [doc_ids[i] for i in row] for qid, row in zip(query_ids, indices.tolist(), strict=True)}


def hnsw_memory_estimate(n: int, dimension: int, m: int) -> int:
    """Bytes hnswlib (Milvus's HNSW) allocates: per vector its floats, 2M level-0 links, a link count
    and a label; upper levels hold about n/M vectors with M links each."""
    level0 = n * (4 * dimension + 4 * 2 * m + 4 + 8)
    upper = (n // max(1, m)) * (4 * m + 4)
    return level0 + upper


def hnsw_params(index: Mapping[str, Any]) -> dict[str, int | None]:
    """M and efConstruction of an index description, nested under "params" or not (servers differ)."""
    params = index.get("params") or {}
    if isinstance(params, str):
        params = json.loads(params)
    found = {key: params.get(key, index.get(key)) for key in ("M", "efConstruction")}
    return {key: None if value is None else int(value) for key, value in found.items()}


def hnsw_sweep_point(
    store: MilvusStore,
    name: str,
    base: CollectionIdentity,
    corpus: StoredCorpus,
    query_floats: np.ndarray,
    exact_top: Sequence[Sequence[str]],
    m: int,
    ef_construction: int,
    efs: Sequence[int],
    k: int = TOP_K,
) -> list[dict[str, Any]]:
    """Build HNSW(M, efConstruction) over the corpus's float32 vectors in a scratch collection `name`,
    then for each ef: ANN recall@k against exact search and search latency (one query per
    request). Build time runs from create_index until Milvus reports every row indexed."""
    identity = replace(
        base,
        precision="float32",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        rerank=None,
        hnsw={"M": m, "efConstruction": ef_construction},
    )
    if store.has_collection(name):
        store.drop_collection(name)
    write_encoded_collection(
        store, name, identity, corpus, corpus.floats, SWEEP_TEXT_BYTES, keep_text=False, build_index=False
    )
    try:
        t0 = time.perf_counter()
        store.create_vector_index(name, identity)
        desc = store.wait_for_index(name)
        t1 = time.perf_counter()
        store.load(name)  # Milvus Lite builds its index here, a server only reads it
        t2 = time.perf_counter()
        memory = store.loaded_memory_bytes(name)
        built = hnsw_params(desc)
        if built != {"M": m, "efConstruction": ef_construction}:
            raise ReembedError(
                f"Milvus describes the sweep's index with {built}, not M={m}, efConstruction={ef_construction}: "
                "it did not build what was asked"
            )
        points = []
        for ef in efs:
            for i in range(min(WARMUP_QUERIES, len(query_floats))):
                search_collection(store, name, query_floats[i : i + 1], "FLOAT_VECTOR", k, ef, output_fields=())
            latencies, shares = [], []
            for i, reference in enumerate(exact_top):
                t = time.perf_counter()
                hits = search_collection(store, name, query_floats[i : i + 1], "FLOAT_VECTOR", k, ef, output_fields=())
                latencies.append((time.perf_counter() - t) * 1e3)
                shares.append(len({h.id for h in hits[0]} & set(reference[:k])) / max(1, len(reference[:k])))
            points.append(
                {
                    "M": m,
                    "efConstruction": ef_construction,
                    "ef": max(ef, k),
                    f"ann_recall@{k}": round(float(np.mean(shares)), 4),
                    "search_ms_p50": percentile_ms(latencies, 50),
                    "search_ms_p95": percentile_ms(latencies, 95),
                    "build_s": round(t1 - t0, 3),
                    "load_s": round(t2 - t1, 3),
                    "index_type": desc.get("index_type", "HNSW"),
                    "memory_bytes": memory,
                    "memory_bytes_estimate": hnsw_memory_estimate(len(corpus.ids), corpus.dimension, m),
                }
            )
        return points
    finally:
        store.drop_collection(name)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: str, title: str, k: int = TOP_K) -> None:
    """PNG of the sweep, one line per (M, efConstruction): ANN recall@k against ef (left) and against
    search latency p50, one dot per ef (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    groups: dict[tuple[int, int], list[Mapping[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(p["M"], p["efConstruction"])].append(p)
    fig, (by_ef, by_latency) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for (m, efc), group in sorted(groups.items()):
        group = sorted(group, key=lambda p: p["ef"])
        recall = [p[f"ann_recall@{k}"] for p in group]
        (line,) = by_ef.plot([p["ef"] for p in group], recall, marker="o", label=f"M={m}, efConstruction={efc}")
        latency = [p["search_ms_p50"] for p in group]
        by_latency.plot(latency, recall, marker="o", color=line.get_color())
        for p, x, y in zip(group, latency, recall, strict=True):
            by_latency.annotate(
                f"{p['ef']}", (x, y), fontsize=6, color=line.get_color(), xytext=(3, -8), textcoords="offset points"
            )
    by_ef.set_xscale("log", base=2)
    efs = sorted({p["ef"] for p in points})
    by_ef.set_xticks(efs, [str(ef) for ef in efs])
    by_ef.minorticks_off()
    by_ef.set_xlabel("search ef")
    by_ef.set_ylabel(f"ANN recall@{k} against exact search")
    by_ef.legend(fontsize=7, loc="lower right")
    by_latency.set_xlabel("search latency p50 (ms, one query per request; dots labelled with ef)")
    for ax in (by_ef, by_latency):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_row(r, widths) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a person reads it: the precision table, the calibration, the HNSW sweep."""
    d, exact = report["data"], report["exact"]
    lines = [
        f"{d['name']}: {d['documents']} documents, {d['queries']} judged queries; {report['model']['name']} "
        f"(d={report['model']['dimension']}); Milvus {report['milvus']['version']}; ef={report['search']['ef']}, "
        f"re-rank k x {report['search']['rescore_multiplier']}",
    ]
    header = ["mode", *TABLE_METRICS, "ndcg@10/f32", "bytes/vec", "stored", "p50 ms", "top10∩exact"]
    rows = [header, ["exact (in memory)", *(f"{exact[m]:.4f}" for m in TABLE_METRICS), "", "", "", "", ""]]
    for name, r in report["results"].items():
        if "refused" in r:
            rows.append([name, "refused", *[""] * (len(header) - 2)])
            continue
        ratio = r.get("ndcg@10_ratio_to_float32")
        size = str(r["code_bytes_per_vector"])
        if r["rerank_bytes_per_vector"]:
            size += f"+{r['rerank_bytes_per_vector']}"
        rows.append(
            [
                name,
                *(f"{r[m]:.4f}" for m in TABLE_METRICS),
                "" if ratio is None else f"{ratio:.4f}",
                size,
                str(r["stored_bytes_per_vector"]),
                f"{r['search_ms_p50']:.2f}",
                f"{r['top10_overlap_with_exact']:.3f}",
            ]
        )
    lines += _table(rows)
    for name, r in report["results"].items():
        if "refused" in r:
            lines.append(f"{name}: refused: {r['refused']}")
    cal = report["calibration"]
    after = cal["after_calibration"]
    lines.append(
        f"int8: one scale fitted on the first {cal['sample_size']} documents at quantile {cal['quantile']}; "
        f"clipped: {cal['sample_clipped_fraction']:.2e} of the sample's values, {after['clipped_fraction']:.2e} "
        f"of the {after['documents']} documents after it (drift flagged above {after['drift_threshold']:.0e}: "
        f"{'DRIFT' if after['drift'] else 'no drift'}), {cal['queries_clipped_fraction']:.2e} of the queries'"
    )
    for target in report["targets"].values():
        verdict = "n/a" if target["met"] is None else ("met" if target["met"] else "NOT met")
        value = "" if target["value"] is None else f"{target['value']:.4f}"
        lines.append(f"target {target['name']}: {value} (want {target['want']}): {verdict}")
    depth = report.get("rerank_depth_in_memory") or {}
    if depth:
        cells = [
            f"x{mult}: " + ", ".join(f"{name} {ndcg:.4f}" for name, ndcg in by_mode.items())
            for mult, by_mode in depth.items()
        ]
        lines.append(f"re-rank depth k x multiplier, nDCG@{TOP_K} in memory: " + "; ".join(cells))
    sweep = report.get("hnsw_sweep") or []
    if sweep:
        rows = [["M", "efC", "ef", "ann_recall@10", "p50 ms", "p95 ms", "build s", "load s", "MiB", "estimate MiB"]]
        for p in sweep:
            memory = "" if p["memory_bytes"] is None else f"{p['memory_bytes'] / 2**20:.2f}"
            rows.append(
                [
                    str(p["M"]),
                    str(p["efConstruction"]),
                    str(p["ef"]),
                    f"{p['ann_recall@10']:.4f}",
                    f"{p['search_ms_p50']:.2f}",
                    f"{p['search_ms_p95']:.2f}",
                    f"{p['build_s']:.2f}",
                    f"{p['load_s']:.2f}",
                    memory,
                    f"{p['memory_bytes_estimate'] / 2**20:.2f}",
                ]
            )
        lines.append("HNSW sweep (float32):")
        lines += _table(rows)
    return "\n".join(lines)
