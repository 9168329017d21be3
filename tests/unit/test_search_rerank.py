"""Two-stage search's second stage and the binary query codec, called directly (no Milvus)."""

import numpy as np
import pytest

from reembed.quantize import RERANK_ENCODING, encode_rerank_vectors
from reembed.search import Hit, QueryCodec, rerank, search_reranked
from reembed.store import F_RERANK, F_TEXT, CollectionIdentity


def binary_identity(rerank_copies: str | None = RERANK_ENCODING) -> CollectionIdentity:
    return CollectionIdentity(
        model={"name": "m", "weights_sha256": "abc", "dimension": 4, "normalize": True},
        precision="binary",
        vector_type="BINARY_VECTOR",
        calibration=None,
        partitioning={"scheme": "hash", "partitions": 1},
        hnsw={"M": 16, "efConstruction": 64},
        rerank=rerank_copies,
    )


def hits_for(docs: np.ndarray, ids: list[str]) -> list[Hit]:
    copies = encode_rerank_vectors(docs)
    return [
        Hit(i, float(n), {F_TEXT: f"text {i}", F_RERANK: c}) for n, (i, c) in enumerate(zip(ids, copies, strict=True))
    ]


def test_rerank_orders_candidates_by_float_inner_product():
    # q = (1, 0, 0, 0): a -> 0.0, b -> 0.6, c -> 1.0 (first stage had them a, b, c)
    query = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    docs = np.array([[0, 1, 0, 0], [0.6, 0.8, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    [row] = rerank(query, [hits_for(docs, ["a", "b", "c"])], k=2, dimension=4)
    assert [h.id for h in row] == ["c", "b"]
    # cosines from the float16 copies: 1.0 exactly, 0.6 within float16 rounding (0.60009765625)
    assert row[0].score == 1.0 and row[1].score == pytest.approx(0.6, abs=1e-3)
    assert row[0].fields == {F_TEXT: "text c"}  # the copy is not handed back


def test_rerank_keeps_first_stage_order_on_ties_and_handles_empty_rows():
    query = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=np.float32)
    docs = np.array([[0.5, 0, 0, 0.5], [0.5, 0, 0.5, 0]], dtype=np.float32)  # both 0.5 for query 0
    rows = rerank(query, [hits_for(docs, ["x", "y"]), []], k=2, dimension=4)
    assert [h.id for h in rows[0]] == ["x", "y"] and rows[1] == []


def test_binary_codec_sends_sign_bits():
    codec = QueryCodec(binary_identity())
    bits = codec.to_search_vectors(np.array([[0.1, -0.2, 0.3, -0.4, 0.5, 0.6, -0.7, 0.8]], dtype=np.float32))
    assert bits.dtype == np.uint8 and bits.tolist() == [[0b10101101]]
    assert codec.score_to_cosine(7.0) == 7.0  # a Hamming distance stays one


def test_search_reranked_checks_its_arguments_before_searching():
    query = np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="keeps no re-rank vectors"):
        search_reranked(None, "c", QueryCodec(binary_identity(None)), query, 10, 64)
    with pytest.raises(ValueError, match=r"k \* rescore_multiplier must be <= 16384.*100 \* 200 = 20000"):
        search_reranked(None, "c", QueryCodec(binary_identity()), query, 100, 64, rescore_multiplier=200)
