"""The search service's Milvus step on a real Milvus Lite: concurrent requests with the same
parameters are merged into one search, each still gets its own answer; a collection that keeps
re-rank copies is searched in two stages and scored as cosines.

No Ray and no model (the step under test is the search; the query vectors are given): the
service's `embed` is a lookup of fixed unit vectors.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from reembed.config import ServiceConfig
from reembed.evaluation import StoredCorpus, encoded_identity, write_encoded_collection
from reembed.quantize import fit_int8
from reembed.store import CollectionIdentity, MilvusStore
from serve.models import SearchRequest
from serve.service import SearchService

pytestmark = pytest.mark.integration
DIM = 16
DOCS = 60
MODEL = {"name": "fixed-vectors", "weights_sha256": "f" * 64, "dimension": DIM, "normalize": True}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def lite_db(tmp_path_factory):
    """A float32 collection and an int8 + re-rank copy of the same documents, and the query vectors."""
    rng = np.random.default_rng(11)
    docs = unit(rng.normal(size=(DOCS, DIM)))
    queries = {f"q{i}": unit(rng.normal(size=DIM)) for i in range(20)}
    uri = str(tmp_path_factory.mktemp("merge") / "m.db")
    corpus = StoredCorpus(
        ids=[f"d{i}" for i in range(DOCS)],
        floats=docs,
        fields=[{"text": f"doc {i}", "content_sha256": f"h{i}", "partition": "_default"} for i in range(DOCS)],
    )
    base = CollectionIdentity(
        model=MODEL,
        precision="float32",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        partitioning={"kind": "single"},
        hnsw={"M": 16, "efConstruction": 64},
    )
    calibration = fit_int8(docs)
    store = MilvusStore(uri)
    try:
        write_encoded_collection(store, "plain", base, corpus, docs, 64)
        int8 = encoded_identity(base, "int8", "FLOAT_VECTOR", calibration)
        write_encoded_collection(store, "two_stage", int8, corpus, calibration.quantize(docs), 64)
    finally:
        store.close()
    return {"uri": uri, "docs": docs, "queries": queries}


def make_service(db: dict[str, Any], collection: str, **cfg: Any) -> SearchService:
    async def embed(model: dict[str, Any], texts: list[str]) -> list[np.ndarray]:
        return [db["queries"][t] for t in texts]

    async def check(model: dict[str, Any]) -> dict[str, Any]:
        return {"model": model["name"]}

    return SearchService(ServiceConfig(milvus_uri=db["uri"], collection=collection, **cfg), embed, check)


async def _search_all(service: SearchService, requests: list[SearchRequest]) -> list[Any]:
    return await asyncio.gather(*(service.search(r) for r in requests))


def ranking(response: Any) -> list[tuple[str, float]]:
    return [(h.id, round(h.score, 4)) for h in response.results]


def test_concurrent_searches_are_merged_and_each_gets_its_own_answer(lite_db):
    names = sorted(lite_db["queries"])
    one_by_one = make_service(lite_db, "plain")
    merged = make_service(lite_db, "plain")
    try:
        alone = [asyncio.run(one_by_one.search(SearchRequest(query=q, k=5, ef=DOCS))) for q in names]
        assert one_by_one.search_calls == len(names)
        together = asyncio.run(_search_all(merged, [SearchRequest(query=q, k=5, ef=DOCS) for q in names]))
    finally:
        one_by_one.close()
        merged.close()
    assert [ranking(r) for r in together] == [ranking(r) for r in alone]
    stats = merged.stats()["searches"]
    assert stats["queries"] == len(names)
    assert stats["milvus_calls"] < len(names), stats
    # And the answers are the right ones: exact cosine order over these few documents (ef >= DOCS).
    for name, response in zip(names, together, strict=True):
        exact = np.argsort(-(lite_db["docs"] @ lite_db["queries"][name]))[:5]
        assert [h.id for h in response.results] == [f"d{i}" for i in exact]


def test_requests_with_other_parameters_are_not_merged_into_each_other(lite_db):
    service = make_service(lite_db, "plain")
    try:
        requests = [
            SearchRequest(query="q1", k=2),
            SearchRequest(query="q1", k=7),
            SearchRequest(query="q2", k=3, filter={"field": "id", "op": "in", "value": ["d1", "d2", "d3"]}),
            SearchRequest(queries=["q3", "q4"], k=4),
        ]
        replies = asyncio.run(_search_all(service, requests))
    finally:
        service.close()
    assert [len(r.results) for r in replies[:2]] == [2, 7]
    assert {h.id for h in replies[2].results} <= {"d1", "d2", "d3"} and len(replies[2].results) == 3
    assert [len(row) for row in replies[3].results] == [4, 4]
    assert service.stats()["searches"] == {"milvus_calls": 4, "queries": 5}


def test_a_collection_with_rerank_copies_is_searched_in_two_stages(lite_db):
    """int8 codes first (top k x rescore_multiplier), then the float16 copies re-score: cosines."""
    service = make_service(lite_db, "two_stage", rescore_multiplier=DOCS // 5)
    try:
        names = sorted(lite_db["queries"])[:6]
        replies = asyncio.run(_search_all(service, [SearchRequest(query=q, k=5, ef=DOCS) for q in names]))
    finally:
        service.close()
    copies = lite_db["docs"].astype(np.float16).astype(np.float32)  # what the re-rank copies hold
    for name, reply in zip(names, replies, strict=True):
        assert reply.collection == "two_stage"
        scores = copies @ lite_db["queries"][name]
        exact = np.argsort(-scores)[:5]
        assert [h.id for h in reply.results] == [f"d{i}" for i in exact]
        # Scores are cosines of the float query with the copies, not int8 code inner products.
        np.testing.assert_allclose([h.score for h in reply.results], scores[exact], atol=1e-5)
        assert all("rerank_vector" not in h.fields for h in reply.results)
