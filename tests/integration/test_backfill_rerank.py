"""Two-stage collections made by the backfill job: int8 codes or binary sign bits, each document
with a float16 re-rank copy, searched codes first and floats second (reembed.search.search_reranked,
the path the search service takes for such a collection)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.backfill import parse_config, run
from reembed.errors import CapabilityError, ModelMismatchError
from reembed.quantize import RERANK_ENCODING, Int8Calibration, decode_rerank_vectors
from reembed.search import Searcher
from reembed.store import F_ID, F_RERANK, F_VECTOR, MilvusStore
from tests.conftest import cranfield_docs, write_jsonl
from tests.integration.test_backfill_lite import backfill_argv

pytestmark = pytest.mark.integration


def check_two_stage_search(uri: str, collection: str, docs: list[dict]) -> None:
    store = MilvusStore(uri)
    try:
        searcher = Searcher(store, collection, device="cpu")
        assert searcher.identity.rerank == RERANK_ENCODING
        titles = [docs[i]["title"] for i in (3, 11, 20)]
        hits, _ = searcher.search(titles, k=5, ef=64)
        for i, row in zip((3, 11, 20), hits, strict=True):
            assert row[0].id == docs[i]["_id"]
            # Scored as cosines of the float query with the float16 copies: descending, at most 1.
            scores = [h.score for h in row]
            assert scores == sorted(scores, reverse=True) and 0.3 < scores[0] <= 1.0 + 1e-3
            assert F_RERANK not in row[0].fields
    finally:
        store.close()


def test_int8_with_rerank_copies_on_milvus_lite(tmp_path, cranfield, ray_local):
    docs = cranfield_docs(cranfield, 40)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    argv = [*backfill_argv(tmp_path, src), "--rerank"]
    first = run(parse_config(argv))
    assert first["written"] == 40 and first["rerank"] == RERANK_ENCODING and first["precision"] == "int8"
    with pytest.raises(ModelMismatchError, match="rerank: collection has 'float16-base64', this run has None"):
        run(parse_config(backfill_argv(tmp_path, src)))  # the same collection without --rerank

    # Read in this process last: an in-process Milvus Lite keeps the .db locked until the process ends.

    store = MilvusStore(str(tmp_path / "m.db"))
    try:
        identity = store.read_identity("docs")
        rows = store.query("docs", f'{F_ID} != ""', [F_ID, F_VECTOR, F_RERANK], limit=100)
    finally:
        store.close()
    assert len(rows) == 40
    # Each copy is the same embedding the codes were made from: unit length, and its int8 code
    # is the stored one (up to a value on a rounding edge in float16).
    copies = decode_rerank_vectors([r[F_RERANK] for r in rows], 384)
    np.testing.assert_allclose(np.linalg.norm(copies, axis=1), 1.0, atol=2e-3)
    codes = np.asarray([r[F_VECTOR] for r in rows], dtype=np.float32)
    requantized = Int8Calibration.from_json(identity.calibration).quantize(copies).astype(np.float32)
    assert np.mean(np.abs(requantized - codes) <= 1) > 0.999

    check_two_stage_search(str(tmp_path / "m.db"), "docs", docs)


def test_binary_is_refused_on_milvus_lite_before_any_work(tmp_path, cranfield):
    src = write_jsonl(tmp_path / "a.jsonl", cranfield_docs(cranfield, 3))
    with pytest.raises(CapabilityError, match="BINARY_VECTOR"):
        run(parse_config(backfill_argv(tmp_path, src, precision="binary")))
    assert not (tmp_path / "runs").exists()


@pytest.mark.milvus_server
def test_binary_with_rerank_copies_on_the_milvus_server(tmp_path, cranfield, ray_local, milvus_server):
    docs = cranfield_docs(cranfield, 40)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    summary = run(
        parse_config(
            backfill_argv(tmp_path, src, collection="binary_docs", milvus_uri=milvus_server, precision="binary")
        )
    )
    assert summary["written"] == 40 and summary["vector_type"] == "BINARY_VECTOR"
    assert summary["rerank"] == RERANK_ENCODING and summary["calibration"] is None
    check_two_stage_search(milvus_server, "binary_docs", docs)
