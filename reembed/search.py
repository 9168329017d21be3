"""Query side: embed queries the way the collection says, search Milvus, time both halves.

Used by the demo, the evaluation and the search service's deployments. `QueryEncoder` reads the
model identity and int8 calibration from the collection's properties and refuses a model whose
weights differ; `search_collection` runs one Milvus search for a batch of query vectors.

Two-stage search (`search_reranked`): where a collection keeps re-rank copies of its vectors
beside compact codes (binary or int8), the first stage fetches the top k * rescore_multiplier by
code (Hamming distance or code inner product) with their copies, and the float inner product of
the float query with those copies picks the final k, scored as cosines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from reembed.config import DEFAULT_RESCORE_MULTIPLIER
from reembed.embedder import Embedder, ModelSource, resolve_model, weights_sha256
from reembed.errors import ModelMismatchError
from reembed.quantize import INT8_MAX, Int8Calibration, binarize, decode_rerank_vectors, rerank_text_bytes
from reembed.store import (
    F_ID,
    F_PARTITION,
    F_RERANK,
    F_TEXT,
    F_VECTOR,
    MAX_REQUEST_BYTES,
    CollectionIdentity,
    MilvusStore,
    metric_for,
    vector_payload,
)

DEFAULT_OUTPUT_FIELDS = (F_TEXT, F_PARTITION)
# Milvus's cap on one search's limit (topk).
MAX_SEARCH_LIMIT = 16384


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    fields: dict[str, Any]


def model_key(model: dict[str, Any]) -> str:
    """What identifies a query model's vector space: name, weights hash and dimension."""
    backend = model.get("backend", "torch")
    key = f"{model['name']}@{model['weights_sha256'][:16]}/{model['dimension']}"
    return key if backend == "torch" else f"{key}/{backend}"


def load_query_model(
    model: dict[str, Any],
    device: str = "auto",
    source: ModelSource | None = None,
    batch_size: int = 64,
    threads: int | None = 1,
) -> Embedder:
    """Load the model a collection names and prove it is the same one: weights hash and dimension.

    `model` is the `model` part of a collection's identity. Raises ModelMismatchError otherwise.
    """
    source = source or resolve_model(model["name"])
    sha = weights_sha256(source.path)
    if sha != model["weights_sha256"]:
        raise ModelMismatchError(
            f"model {model['name']!r} found at {source.path} has weights {sha[:12]}..., "
            f"the collection was built with {model['weights_sha256'][:12]}..."
        )
    # Queries go through the backend the documents went through (an int8 model is another function).
    backend = model.get("backend", "torch")
    embedder = Embedder(
        source, device="cpu" if backend != "torch" else device, batch_size=batch_size, threads=threads, backend=backend
    )
    if embedder.dimension != model["dimension"]:
        raise ModelMismatchError(f"model dimension {embedder.dimension} != collection dimension {model['dimension']}")
    return embedder


class QueryCodec:
    """Turns float query embeddings into the collection's search vectors and scores back to cosines."""

    def __init__(self, identity: CollectionIdentity) -> None:
        self.identity = identity
        self.calibration = Int8Calibration.from_json(identity.calibration) if identity.calibration else None

    def to_search_vectors(self, floats: np.ndarray) -> np.ndarray:
        """int8 codes (as int8), packed sign bits (uint8, (n, d/8)) or the unit float32 vectors, (n, d)."""
        if self.identity.precision == "int8" and self.calibration is not None:
            return self.calibration.quantize(floats)
        if self.identity.precision == "binary":
            return binarize(floats)
        return floats

    def score_to_cosine(self, score: float) -> float:
        """Inner products of global-scale int8 codes are (127/scale)^2 times the cosine.

        Binary first-stage scores are Hamming distances and stay so (re-ranking scores cosines)."""
        cal = self.calibration
        if self.identity.precision == "int8" and cal is not None and cal.scheme == "global":
            return float(score) * (cal.scale[0] / INT8_MAX) ** 2
        return float(score)


class QueryEncoder:
    """Embeds queries into a collection's vector space: same model, same int8 codes as the job."""

    def __init__(
        self,
        identity: CollectionIdentity,
        device: str = "auto",
        source: ModelSource | None = None,
        batch_size: int = 64,
    ) -> None:
        self.identity = identity
        self.embedder = load_query_model(identity.model, device, source, batch_size)
        self.codec = QueryCodec(identity)
        self.calibration = self.codec.calibration

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors ready for search: int8 codes (as int8) or unit float32, shape (n, d)."""
        return self.codec.to_search_vectors(self.embedder.encode_queries(queries))

    def score_to_cosine(self, score: float) -> float:
        return self.codec.score_to_cosine(score)


def search_collection(
    store: MilvusStore,
    collection: str,
    vectors: np.ndarray,
    vector_type: str,
    k: int,
    ef: int,
    partitions: list[str] | None = None,
    filter_expr: str = "",
    output_fields: tuple[str, ...] = DEFAULT_OUTPUT_FIELDS,
) -> list[list[Hit]]:
    """One Milvus search for a batch of query vectors; HNSW `ef` is raised to at least k."""
    metric = metric_for(vector_type)
    params = {} if metric == "HAMMING" else {"ef": max(ef, k)}  # BIN_FLAT is exhaustive: no ef
    result = store._call(
        "search",
        store.client.search,
        collection,
        data=vector_payload(vectors, vector_type),
        anns_field=F_VECTOR,
        limit=k,
        filter=filter_expr,
        partition_names=partitions or None,
        output_fields=list(output_fields),
        search_params={"metric_type": metric, "params": params},
    )
    return [
        [
            Hit(id=str(h[F_ID] if F_ID in h else h["id"]), score=float(h["distance"]), fields=dict(h.get("entity", {})))
            for h in hits
        ]
        for hits in result
    ]


def rerank(query_floats: np.ndarray, candidates: list[list[Hit]], k: int, dimension: int) -> list[list[Hit]]:
    """Re-score each query's candidates by the inner product of its float query (nq, d) with their
    re-rank copies (the F_RERANK field of each hit); keep the best k, scored as cosines.

    Ties keep the first stage's order. The copies are dropped from the returned fields."""
    out: list[list[Hit]] = []
    for query, row in zip(query_floats, candidates, strict=True):
        if not row:
            out.append([])
            continue
        docs = decode_rerank_vectors([h.fields[F_RERANK] for h in row], dimension)
        scores = docs @ query.astype(np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        out.append(
            [Hit(row[i].id, float(scores[i]), {f: v for f, v in row[i].fields.items() if f != F_RERANK}) for i in order]
        )
    return out


def search_reranked(
    store: MilvusStore,
    collection: str,
    codec: QueryCodec,
    query_floats: np.ndarray,
    k: int,
    ef: int,
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
    partitions: list[str] | None = None,
    filter_expr: str = "",
    output_fields: tuple[str, ...] = DEFAULT_OUTPUT_FIELDS,
) -> list[list[Hit]]:
    """Two-stage search: top k * rescore_multiplier by code, then float re-ranking to k.

    `query_floats` are the unit float32 query embeddings (n, d); the collection must keep re-rank
    copies (identity.rerank). Queries are sent in groups whose answers (candidates with their
    copies) stay under the request budget, so a deep search never hits gRPC's message cap.
    """
    identity = codec.identity
    if not identity.rerank:
        raise ValueError(f"search_reranked: collection {collection!r} keeps no re-rank vectors (identity.rerank)")
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier: expected >= 1, got {rescore_multiplier}")
    limit = k * rescore_multiplier
    if limit > MAX_SEARCH_LIMIT:
        raise ValueError(
            f"rescore_multiplier: k * rescore_multiplier must be <= {MAX_SEARCH_LIMIT} (Milvus's search limit), "
            f"got {k} * {rescore_multiplier} = {limit}"
        )
    dimension = int(identity.model["dimension"])
    vectors = codec.to_search_vectors(query_floats)
    per_request = max(1, MAX_REQUEST_BYTES // (limit * (rerank_text_bytes(dimension) + 256)))
    fields = (*[f for f in output_fields if f != F_RERANK], F_RERANK)
    candidates: list[list[Hit]] = []
    for start in range(0, len(vectors), per_request):
        candidates += search_collection(
            store,
            collection,
            vectors[start : start + per_request],
            identity.vector_type,
            limit,
            ef,
            partitions,
            filter_expr,
            fields,
        )
    return rerank(query_floats, candidates, k, dimension)


def search_queries(
    store: MilvusStore,
    collection: str,
    codec: QueryCodec,
    query_floats: np.ndarray,
    k: int,
    ef: int,
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
    partitions: list[str] | None = None,
    filter_expr: str = "",
    output_fields: tuple[str, ...] = DEFAULT_OUTPUT_FIELDS,
) -> list[list[Hit]]:
    """Search unit float query embeddings (n, d) the way the collection keeps its vectors, scored as
    cosines: in two stages where it keeps re-rank copies (`search_reranked`), else one search by its
    codes (or floats). The search path of `Searcher` and of the search service."""
    if codec.identity.rerank:
        return search_reranked(
            store, collection, codec, query_floats, k, ef, rescore_multiplier, partitions, filter_expr, output_fields
        )
    rows = search_collection(
        store,
        collection,
        codec.to_search_vectors(query_floats),
        codec.identity.vector_type,
        k,
        ef,
        partitions,
        filter_expr,
        output_fields,
    )
    return [[Hit(h.id, codec.score_to_cosine(h.score), h.fields) for h in row] for row in rows]


class Searcher:
    """A collection (or alias) with its query encoder: `search(queries)` -> hits and timings.

    A collection that keeps re-rank copies is searched in two stages (`search_reranked`)."""

    def __init__(
        self,
        store: MilvusStore,
        collection: str,
        device: str = "auto",
        rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
    ) -> None:
        identity = store.read_identity(collection)
        if identity is None:
            raise ModelMismatchError(f"collection {collection!r} has no reembed identity: was it made by the job?")
        self.store = store
        self.collection = collection
        self.identity = identity
        self.encoder = QueryEncoder(identity, device=device)
        self.rescore_multiplier = rescore_multiplier
        store.load(collection)

    def search(
        self, queries: list[str], k: int = 10, ef: int = 64, partitions: list[str] | None = None, filter_expr: str = ""
    ) -> tuple[list[list[Hit]], dict[str, float]]:
        t0 = time.perf_counter()
        floats = self.encoder.embedder.encode_queries(queries)
        t1 = time.perf_counter()
        hits = search_queries(
            self.store,
            self.collection,
            self.encoder.codec,
            floats,
            k,
            ef,
            self.rescore_multiplier,
            partitions,
            filter_expr,
        )
        t2 = time.perf_counter()
        timing = {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        return hits, timing
