"""Retrieval quality: read a BEIR-layout test set, search exactly in memory, score rankings.

Exact in-memory search comes in the encodings the project stores: inner product of floats or of
int8 codes (`exact_search`), Hamming distance of sign bits (`hamming_search`), and float
re-ranking of candidates (`rescore`).

Sits at the end of the flow, beside it rather than in it: `benchmarks/quantization.py` and the
evaluation compare what the pipeline returns (or what a quantised index would return) against
exact search over the same vectors, scored with the metrics here. Pure numpy and Python, so the
numbers do not depend on an evaluation package's version.

Conventions, the same as trec_eval / pytrec_eval (and so BEIR) use:
- a judgement with score <= 0 means "not relevant" and is dropped when loading;
- nDCG uses linear gains (the judged score itself) and a log2(rank + 1) discount; the ideal
  ranking is built from the judgements, not from the run;
- a query without positive judgements is skipped (it has no ideal ranking to compare with);
  a judged query that is missing from the run counts as an empty ranking, i.e. scores 0, so a
  system that answers nothing is not rewarded by a smaller denominator;
- a document id repeated in one ranking counts once, at its first rank.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

Run = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]

# Rows of the score matrix held at once in exact_search: bounds memory for big query sets.
_QUERY_CHUNK = 1024
# Popcount of every byte value: Hamming distance on packed bits without numpy>=2's bitwise_count.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
# Query rows per Hamming block: the (queries, docs, bytes) XOR array stays a few MB per 1k docs.
_HAMMING_CHUNK = 64


def load_beir(
    directory: str | Path, split: str = "test"
) -> tuple[dict[str, dict], dict[str, str], dict[str, dict[str, int]]]:
    """Read a BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv.

    Returns (corpus: doc id -> record as read, queries: query id -> text,
    qrels: query id -> {doc id: score > 0}). Ids are strings, as BEIR writes them.
    """
    root = Path(directory)
    corpus: dict[str, dict] = {}
    with open(root / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                corpus[str(record["_id"])] = record
    queries: dict[str, str] = {}
    with open(root / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                queries[str(record["_id"])] = record["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(root / "qrels" / f"{split}.tsv", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise ValueError(
                f"load_beir: qrels/{split}.tsv must start with the header query-id, corpus-id, score; got {header!r}"
            )
        for row in reader:
            if not row:
                continue
            qid, doc_id, score = row[0], row[1], int(row[2])
            if score > 0:
                qrels.setdefault(qid, {})[doc_id] = score
    return corpus, queries, qrels


def _first_k_unique(ranking: Sequence[str], k: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for doc_id in ranking:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append(doc_id)
            if len(out) == k:
                break
    return out


def _judged(qrels: Qrels) -> dict[str, dict[str, int]]:
    positive = {qid: {d: s for d, s in rels.items() if s > 0} for qid, rels in qrels.items()}
    return {qid: rels for qid, rels in positive.items() if rels}


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean nDCG@k over the judged queries (linear gains, log2 discount)."""
    _check_k(k)
    scores = []
    for qid, rels in _judged(qrels).items():
        ranked = _first_k_unique(run.get(qid, ()), k)
        dcg = sum(rels.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranked))
        ideal = sorted(rels.values(), reverse=True)[:k]
        idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
        scores.append(dcg / idcg)
    return _mean(scores)


def recall_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean share of each query's relevant documents found in its top k."""
    _check_k(k)
    scores = []
    for qid, rels in _judged(qrels).items():
        ranked = _first_k_unique(run.get(qid, ()), k)
        scores.append(sum(1 for d in ranked if d in rels) / len(rels))
    return _mean(scores)


def mrr_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean reciprocal rank of the first relevant document within the top k (0 if none)."""
    _check_k(k)
    scores = []
    for qid, rels in _judged(qrels).items():
        ranked = _first_k_unique(run.get(qid, ()), k)
        scores.append(next((1.0 / (rank + 1) for rank, d in enumerate(ranked) if d in rels), 0.0))
    return _mean(scores)


def evaluate(run: Run, qrels: Qrels, ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """nDCG, recall and MRR at each k, as {"ndcg@10": ..., "recall@100": ..., "mrr@10": ...}."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(run, qrels, k)
        out[f"recall@{k}"] = recall_at_k(run, qrels, k)
        out[f"mrr@{k}"] = mrr_at_k(run, qrels, k)
    return out


def exact_search(query_vecs: np.ndarray, doc_vecs: np.ndarray, k: int) -> np.ndarray:
    """Top-k documents by inner product for each query: int64 indices (n_queries, min(k, n_docs)).

    query_vecs (nq, d) and doc_vecs (nd, d) are both float (searched as float32) or both signed
    integer codes such as int8 (searched as int32, so every inner product is the exact integer
    Milvus ranks by; summing in int8 would overflow). Best first; equal scores keep the lower
    document index first, so the result is deterministic. Packed binary codes (uint8) are
    refused: their inner product means nothing, search them by Hamming distance.
    """
    _check_k(k)
    if query_vecs.ndim != 2 or doc_vecs.ndim != 2 or query_vecs.shape[1] != doc_vecs.shape[1]:
        raise ValueError(
            f"exact_search: expected (nq, d) and (nd, d) arrays, got {query_vecs.shape} and {doc_vecs.shape}"
        )
    kinds = {query_vecs.dtype.kind, doc_vecs.dtype.kind}
    if kinds == {"f"}:
        work_dtype = np.float32
    elif kinds == {"i"}:
        # int8 products summed over any realistic d fit in int32; wider codes get int64.
        wide = max(query_vecs.dtype.itemsize, doc_vecs.dtype.itemsize) > 1
        work_dtype = np.int64 if wide else np.int32
    else:
        raise ValueError(
            "exact_search: queries and documents must both be float or both signed integer codes, "
            f"got {query_vecs.dtype} and {doc_vecs.dtype} (packed binary codes need Hamming search)"
        )
    k = min(k, doc_vecs.shape[0])
    docs_t = doc_vecs.astype(work_dtype).T
    out = np.empty((query_vecs.shape[0], k), dtype=np.int64)
    for start in range(0, query_vecs.shape[0], _QUERY_CHUNK):
        scores = query_vecs[start : start + _QUERY_CHUNK].astype(work_dtype) @ docs_t
        # A stable sort of the negated scores gives best-first with ties in index order;
        # argpartition would be faster but picks among tied scores arbitrarily.
        out[start : start + _QUERY_CHUNK] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return out


def hamming_search(query_bits: np.ndarray, doc_bits: np.ndarray, k: int) -> np.ndarray:
    """Top-k documents by smallest Hamming distance: packed uint8 (nq, d/8), (nd, d/8) -> int64 (nq, k).

    Ties keep the lower document index first, as `exact_search` does.
    """
    k = min(k, doc_bits.shape[0])
    out = np.empty((query_bits.shape[0], k), dtype=np.int64)
    for start in range(0, query_bits.shape[0], _HAMMING_CHUNK):
        block = query_bits[start : start + _HAMMING_CHUNK, None, :] ^ doc_bits[None, :, :]
        distances = _POPCOUNT[block].sum(axis=2, dtype=np.int32)
        out[start : start + _HAMMING_CHUNK] = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return out


def rescore(query_vecs: np.ndarray, doc_vecs: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Re-rank each query's candidate indices (nq, c) by float inner product; keep the best k."""
    scores = np.einsum("qd,qcd->qc", query_vecs, doc_vecs[candidates])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


def top_k_agreement(result: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(share of queries whose top-k set equals the reference's, mean share of the top k shared)."""
    same = [set(a) == set(b) for a, b in zip(result.tolist(), reference.tolist(), strict=True)]
    overlap = [len(set(a) & set(b)) / len(b) for a, b in zip(result.tolist(), reference.tolist(), strict=True)]
    return float(np.mean(same)), float(np.mean(overlap))
