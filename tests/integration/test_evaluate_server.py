"""Binary + re-rank against the real Milvus server (2.3.5 from the `milvus` package): BINARY_VECTOR
codes searched by Hamming distance, float re-ranking from the float16 copies kept beside them."""

from __future__ import annotations

import numpy as np
import pytest

from reembed.config import DEFAULT_MODEL
from reembed.documents import C_HASH, C_ID, C_REJECT, C_TEXT, DocumentSpec, normalize_record
from reembed.embedder import Embedder, resolve_model
from reembed.evaluation import (
    SearchMode,
    StoredCorpus,
    encoded_identity,
    in_memory_rankings,
    load_indexed,
    write_encoded_collection,
)
from reembed.metrics import hamming_search
from reembed.quantize import binarize, fit_int8
from reembed.search import QueryCodec, Searcher, search_collection
from reembed.store import DEFAULT_PARTITION, F_HASH, F_PARTITION, F_RERANK, F_TEXT, CollectionIdentity, MilvusStore
from tests.conftest import read_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.milvus_server]

COLLECTION = "eval_test_binary"


@pytest.fixture(scope="module")
def embedded(cranfield):
    """300 Cranfield documents and 20 queries embedded in this process (the job is tested elsewhere)."""
    rows = [normalize_record(r, "c", "", DocumentSpec()) for r in read_jsonl(cranfield / "corpus.jsonl")[:300]]
    rows = [r for r in rows if not r[C_REJECT]]
    embedder = Embedder(resolve_model(DEFAULT_MODEL), device="cpu", threads=1)
    docs = embedder.encode_documents([r[C_TEXT] for r in rows])
    queries = [q["text"] for q in read_jsonl(cranfield / "queries.jsonl")[:20]]
    corpus = StoredCorpus(
        ids=[r[C_ID] for r in rows],
        floats=docs,
        fields=[{F_TEXT: r[C_TEXT], F_HASH: r[C_HASH], F_PARTITION: DEFAULT_PARTITION} for r in rows],
    )
    return corpus, embedder, queries, embedder.encode_queries(queries)


def test_binary_rerank_on_the_milvus_server(milvus_server, embedded):
    corpus, embedder, queries, q = embedded
    base = CollectionIdentity(
        model=embedder.identity().to_dict(),
        precision="float32",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        partitioning={"scheme": "hash", "partitions": 1},
        hnsw={"M": 16, "efConstruction": 64},
    )
    store = MilvusStore(milvus_server)
    try:
        assert store.capabilities.binary_vector and not store.capabilities.is_lite
        if store.has_collection(COLLECTION):
            store.drop_collection(COLLECTION)
        identity = encoded_identity(base, "binary", store.capabilities.vector_type_for("binary"), None)
        write_encoded_collection(store, COLLECTION, identity, corpus, binarize(corpus.floats), 65_535)
        index = load_indexed(store, COLLECTION)
        assert index["index_type"] == "BIN_FLAT" and index["metric_type"] == "HAMMING"
        fields = {f["name"]: f["type"].name for f in store.client.describe_collection(COLLECTION)["fields"]}
        assert fields["vector"] == "BINARY_VECTOR" and fields[F_RERANK] == "VARCHAR"
        assert store.count(COLLECTION) == len(corpus.ids)

        # First stage: Milvus's Hamming distances are exactly those of the packed sign bits.
        first = search_collection(store, COLLECTION, binarize(q), "BINARY_VECTOR", 40, 64, output_fields=())
        q_bits, d_bits = binarize(q), binarize(corpus.floats)
        expected = hamming_search(q_bits, d_bits, 40)
        for i, (row, want) in enumerate(zip(first, expected, strict=True)):
            # nearest first, and the same distances as in memory (ids may differ only among ties)
            want_distances = np.unpackbits(q_bits[i : i + 1] ^ d_bits[want], axis=1).sum(axis=1)
            assert [h.score for h in row] == want_distances.tolist()

        # Both stages: the same ranking as Hamming top 40 re-ranked in memory with the float16 copies.
        mode = SearchMode("binary+rerank", COLLECTION, QueryCodec(identity), ef=64, rescore_multiplier=4)
        got = mode.search(store, q, 10)
        want = in_memory_rankings(q, corpus.floats, fit_int8(corpus.floats), 4, 10, modes=["binary+rerank"])
        want_ids = [[corpus.ids[i] for i in row] for row in want["binary+rerank"]]
        # Hamming ties at the 40th candidate may be broken another way: nearly always the same top 10.
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want_ids, strict=True)])
        assert overlap >= 0.98

        # The Searcher (the service's query path) searches such a collection in two stages by itself.
        searcher = Searcher(store, COLLECTION, device="cpu", rescore_multiplier=4)
        hits, timing = searcher.search(queries[:3], k=5)
        for row, query in zip(hits, q[:3], strict=True):
            scores = [h.score for h in row]
            assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
            best = corpus.ids.index(row[0].id)
            assert scores[0] == pytest.approx(float(corpus.floats[best] @ query), abs=2e-3)  # float16 copies
            assert row[0].fields[F_TEXT] == corpus.fields[best][F_TEXT] and F_RERANK not in row[0].fields
        assert timing["search"] > 0
    finally:
        if store.has_collection(COLLECTION):
            store.drop_collection(COLLECTION)
        store.close()
