"""Query side: embed queries the way the collection says, search Milvus, time both halves.

Used by the demo, the evaluation and the search service's deployments. `QueryEncoder` reads the
model identity and int8 calibration from the collection's properties and refuses a model whose
weights differ; `search_collection` runs one Milvus search for a batch of query vectors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from reembed.embedder import Embedder, ModelSource, resolve_model, weights_sha256
from reembed.errors import ModelMismatchError
from reembed.quantize import INT8_MAX, Int8Calibration
from reembed.store import F_ID, F_PARTITION, F_TEXT, F_VECTOR, CollectionIdentity, MilvusStore, vector_payload

DEFAULT_OUTPUT_FIELDS = (F_TEXT, F_PARTITION)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    fields: dict[str, Any]


def model_key(model: dict[str, Any]) -> str:
    """What identifies a query model's vector space: name, weights hash and dimension."""
    return f"{model['name']}@{model['weights_sha256'][:16]}/{model['dimension']}"


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
    embedder = Embedder(source, device=device, batch_size=batch_size, threads=threads)
    if embedder.dimension != model["dimension"]:
        raise ModelMismatchError(f"model dimension {embedder.dimension} != collection dimension {model['dimension']}")
    return embedder


class QueryCodec:
    """Turns float query embeddings into the collection's search vectors and scores back to cosines."""

    def __init__(self, identity: CollectionIdentity) -> None:
        self.identity = identity
        self.calibration = Int8Calibration.from_json(identity.calibration) if identity.calibration else None

    def to_search_vectors(self, floats: np.ndarray) -> np.ndarray:
        """int8 codes (as int8) or the unit float32 vectors, shape (n, d)."""
        if self.identity.precision == "int8" and self.calibration is not None:
            return self.calibration.quantize(floats)
        return floats

    def score_to_cosine(self, score: float) -> float:
        """Inner products of global-scale int8 codes are (127/scale)^2 times the cosine."""
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
        search_params={"metric_type": "IP", "params": {"ef": max(ef, k)}},
    )
    return [
        [
            Hit(id=str(h[F_ID] if F_ID in h else h["id"]), score=float(h["distance"]), fields=dict(h.get("entity", {})))
            for h in hits
        ]
        for hits in result
    ]


class Searcher:
    """A collection (or alias) with its query encoder: `search(queries)` -> hits and timings."""

    def __init__(self, store: MilvusStore, collection: str, device: str = "auto") -> None:
        identity = store.read_identity(collection)
        if identity is None:
            raise ModelMismatchError(f"collection {collection!r} has no reembed identity: was it made by the job?")
        self.store = store
        self.collection = collection
        self.identity = identity
        self.encoder = QueryEncoder(identity, device=device)
        store.load(collection)

    def search(
        self, queries: list[str], k: int = 10, ef: int = 64, partitions: list[str] | None = None, filter_expr: str = ""
    ) -> tuple[list[list[Hit]], dict[str, float]]:
        t0 = time.perf_counter()
        vectors = self.encoder.encode(queries)
        t1 = time.perf_counter()
        hits = search_collection(
            self.store, self.collection, vectors, self.identity.vector_type, k, ef, partitions, filter_expr
        )
        t2 = time.perf_counter()
        hits = [[Hit(h.id, self.encoder.score_to_cosine(h.score), h.fields) for h in row] for row in hits]
        timing = {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        return hits, timing
