"""Ranking metrics and exact search against cases worked out by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reembed.metrics import (
    evaluate,
    exact_search,
    hamming_search,
    load_beir,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    rescore,
    top_k_agreement,
)

LOG2_3 = math.log2(3)  # discount at rank 2: 1.5849625
LOG2_5 = math.log2(5)  # discount at rank 4: 2.3219281


# --- nDCG -----------------------------------------------------------------------------------


def test_ndcg_binary():
    # relevant a, b; ranked x a y b
    # DCG  = 0/log2(2) + 1/log2(3) + 0/log2(4) + 1/log2(5) = 0.6309298 + 0.4306766 = 1.0616064
    # IDCG = 1/log2(2) + 1/log2(3)                         = 1 + 0.6309298         = 1.6309298
    # nDCG = 1.0616064 / 1.6309298 = 0.6509209
    run = {"q": ["x", "a", "y", "b"]}
    qrels = {"q": {"a": 1, "b": 1}}
    assert ndcg_at_k(run, qrels, 4) == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3))
    assert ndcg_at_k(run, qrels, 4) == pytest.approx(0.6509209, abs=1e-6)


def test_ndcg_graded_uses_linear_gains_and_ideal_from_qrels():
    # grades a=3, b=1, c=2; ranked b a z (c never retrieved)
    # DCG  = 1/1 + 3/log2(3) + 0          = 1 + 1.8927893           = 2.8927893
    # IDCG = 3/1 + 2/log2(3) + 1/log2(4)  = 3 + 1.2618595 + 0.5     = 4.7618595
    # nDCG = 2.8927893 / 4.7618595 = 0.6074915
    run = {"q": ["b", "a", "z"]}
    qrels = {"q": {"a": 3, "b": 1, "c": 2}}
    assert ndcg_at_k(run, qrels, 3) == pytest.approx((1 + 3 / LOG2_3) / (3 + 2 / LOG2_3 + 0.5))
    assert ndcg_at_k(run, qrels, 3) == pytest.approx(0.6074915, abs=1e-6)


def test_ndcg_ideal_is_cut_at_k():
    # three relevant, k=2, both retrieved are relevant: DCG = IDCG = 1 + 1/log2(3) -> 1.0
    run = {"q": ["a", "b", "x"]}
    qrels = {"q": {"a": 1, "b": 1, "c": 1}}
    assert ndcg_at_k(run, qrels, 2) == pytest.approx(1.0)


def test_ndcg_counts_only_the_top_k():
    # the only relevant document sits at rank 11: nothing in the top 10 -> 0; at k=11 -> 1/log2(12)
    run = {"q": [f"x{i}" for i in range(10)] + ["a"]}
    qrels = {"q": {"a": 1}}
    assert ndcg_at_k(run, qrels, 10) == 0.0
    assert ndcg_at_k(run, qrels, 11) == pytest.approx(1 / math.log2(12))


def test_repeated_document_counts_once():
    # ranked a a: the second a is ignored, so DCG = 1 (not 1 + 1/log2(3)), IDCG = 1 -> 1.0, not 1.63
    run = {"q": ["a", "a"]}
    qrels = {"q": {"a": 1}}
    assert ndcg_at_k(run, qrels, 2) == pytest.approx(1.0)
    assert recall_at_k(run, qrels, 2) == pytest.approx(1.0)


# --- recall and MRR -------------------------------------------------------------------------


def test_recall_share_of_relevant_found():
    # relevant a b c d; top 3 = a x c -> 2 of 4 = 0.5; at k=2 only a -> 1/4
    run = {"q": ["a", "x", "c", "d"]}
    qrels = {"q": {"a": 1, "b": 1, "c": 1, "d": 1}}
    assert recall_at_k(run, qrels, 3) == pytest.approx(0.5)
    assert recall_at_k(run, qrels, 2) == pytest.approx(0.25)


def test_mrr_mean_over_queries():
    # q1: first relevant at rank 3 -> 1/3; q2: at rank 1 -> 1; mean = (1/3 + 1) / 2 = 2/3
    run = {"q1": ["x", "y", "a", "b"], "q2": ["b", "a"]}
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"b": 1}}
    assert mrr_at_k(run, qrels, 10) == pytest.approx(2 / 3)
    # at k=2 q1 finds nothing -> (0 + 1) / 2 = 0.5
    assert mrr_at_k(run, qrels, 2) == pytest.approx(0.5)


def test_no_relevant_retrieved_scores_zero_everywhere():
    run = {"q": ["x", "y", "z"]}
    qrels = {"q": {"a": 1}}
    assert ndcg_at_k(run, qrels, 3) == 0.0
    assert recall_at_k(run, qrels, 3) == 0.0
    assert mrr_at_k(run, qrels, 3) == 0.0


def test_fewer_results_than_k():
    # relevant a b; the run returns only a, k=10
    # nDCG   = 1 / (1 + 1/log2(3)) = 1 / 1.6309298 = 0.6131472
    # recall = 1/2; MRR = 1/1
    run = {"q": ["a"]}
    qrels = {"q": {"a": 1, "b": 1}}
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(1 / (1 + 1 / LOG2_3))
    assert recall_at_k(run, qrels, 10) == pytest.approx(0.5)
    assert mrr_at_k(run, qrels, 10) == pytest.approx(1.0)


def test_unjudged_queries_skipped_and_unanswered_judged_queries_score_zero():
    # q_extra has no judgements and q_zero only a score-0 judgement: both skipped.
    # q_missing is judged but absent from the run: counts as an empty ranking (0).
    # recall@10 = (q: 1.0 + q_missing: 0.0) / 2 = 0.5
    run = {"q": ["a"], "q_extra": ["a"], "q_zero": ["a"]}
    qrels = {"q": {"a": 1}, "q_zero": {"a": 0}, "q_missing": {"b": 1}}
    assert recall_at_k(run, qrels, 10) == pytest.approx(0.5)
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(0.5)
    assert mrr_at_k(run, qrels, 10) == pytest.approx(0.5)


def test_nothing_judged_gives_zero_not_nan():
    assert ndcg_at_k({"q": ["a"]}, {}, 10) == 0.0


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k({}, {}, 0)


def test_evaluate_keys_and_values():
    # relevant a b; ranked x a
    # @1: nDCG 0, recall 0, MRR 0
    # @2: nDCG = (1/log2(3)) / (1 + 1/log2(3)) = 0.6309298 / 1.6309298 = 0.3868528; recall 1/2; MRR 1/2
    run = {"q": ["x", "a"]}
    qrels = {"q": {"a": 1, "b": 1}}
    result = evaluate(run, qrels, ks=(1, 2))
    assert set(result) == {"ndcg@1", "recall@1", "mrr@1", "ndcg@2", "recall@2", "mrr@2"}
    assert result["ndcg@1"] == result["recall@1"] == result["mrr@1"] == 0.0
    assert result["ndcg@2"] == pytest.approx(0.3868528, abs=1e-6)
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["mrr@2"] == pytest.approx(0.5)
    assert set(evaluate(run, qrels)) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10"}


# --- load_beir ------------------------------------------------------------------------------


def _write_beir(root, qrels_text):
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "T", "text": "one"}\n{"_id": 2, "title": "", "text": "two"}\n', encoding="utf-8"
    )
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "first?"}\n\n', encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text(qrels_text, encoding="utf-8")


def test_load_beir_drops_non_positive_judgements(tmp_path):
    _write_beir(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t2\t0\nq2\td1\t-1\n")
    corpus, queries, qrels = load_beir(tmp_path)
    assert set(corpus) == {"d1", "2"}  # ids become strings
    assert corpus["d1"]["text"] == "one"
    assert queries == {"q1": "first?"}
    assert qrels == {"q1": {"d1": 2}}  # the 0 row dropped, q2 (only -1) gone entirely


def test_load_beir_rejects_a_missing_header(tmp_path):
    _write_beir(tmp_path, "q1\td1\t1\n")
    with pytest.raises(ValueError, match="header"):
        load_beir(tmp_path)


# --- exact_search ---------------------------------------------------------------------------


def test_exact_search_int8_codes():
    # q0 = (1, 2):  docs (1,0)->1  (0,1)->2  (1,1)->3  (-1,-1)->-3   => order 2 1 0 3
    # q1 = (-3, 1): docs (1,0)->-3 (0,1)->1  (1,1)->-2 (-1,-1)->2    => order 3 1 2 0
    queries = np.array([[1, 2], [-3, 1]], dtype=np.int8)
    docs = np.array([[1, 0], [0, 1], [1, 1], [-1, -1]], dtype=np.int8)
    np.testing.assert_array_equal(exact_search(queries, docs, 2), [[2, 1], [3, 1]])
    np.testing.assert_array_equal(exact_search(queries, docs, 4), [[2, 1, 0, 3], [3, 1, 2, 0]])


def test_exact_search_int8_does_not_overflow():
    # q = (127,127,127,127): doc0 = 4 * 127 * 127 = 64516, doc1 = 4 * 127 * 1 = 508, doc2 = -64516.
    # Summed in int8 or int16, 64516 would wrap (64516 mod 2^16 = -1020 as int16) and rank last.
    queries = np.full((1, 4), 127, dtype=np.int8)
    docs = np.array([[1, 1, 1, 1], [127, 127, 127, 127], [-127, -127, -127, -127]], dtype=np.int8)
    np.testing.assert_array_equal(exact_search(queries, docs, 3), [[1, 0, 2]])


def test_exact_search_ties_keep_lower_index_first():
    # q = (1, 1): docs 0, 2 and 3 all score 2, doc 1 scores 0 -> 0 2 3 1
    queries = np.array([[1, 1]], dtype=np.int8)
    docs = np.array([[1, 1], [0, 0], [2, 0], [0, 2]], dtype=np.int8)
    np.testing.assert_array_equal(exact_search(queries, docs, 4), [[0, 2, 3, 1]])


def test_exact_search_k_beyond_corpus_returns_all():
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    docs = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    result = exact_search(queries, docs, 10)
    assert result.shape == (1, 2) and result.dtype == np.int64
    np.testing.assert_array_equal(result, [[1, 0]])


def test_exact_search_float_matches_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    docs = rng.standard_normal((20, 8)).astype(np.float32)
    expected = np.argsort(-(queries @ docs.T), axis=1)[:, :3]
    np.testing.assert_array_equal(exact_search(queries, docs, 3), expected)


@pytest.mark.parametrize(
    ("queries", "docs"),
    [
        (np.zeros((1, 2), np.uint8), np.zeros((3, 2), np.uint8)),  # packed binary codes
        (np.zeros((1, 2), np.float32), np.zeros((3, 2), np.int8)),  # mixed spaces
    ],
)
def test_exact_search_refuses_other_dtypes(queries, docs):
    with pytest.raises(ValueError, match="Hamming"):
        exact_search(queries, docs, 1)


def test_exact_search_shape_mismatch():
    with pytest.raises(ValueError, match="expected"):
        exact_search(np.zeros((1, 3), np.float32), np.zeros((2, 4), np.float32), 1)


# --- hamming_search, rescore, top_k_agreement (moved here from benchmarks/quantization.py) ----


def test_hamming_search_smallest_distance_first_ties_by_index():
    # q = 11110000; doc0 = 11110000 -> 0; doc1 = 11111111 -> 4; doc2 = 00000000 -> 4; doc3 = 11100000 -> 1
    # => 0, 3, then the tie 1, 2 in index order
    query = np.array([[0b11110000]], dtype=np.uint8)
    docs = np.array([[0b11110000], [0b11111111], [0b00000000], [0b11100000]], dtype=np.uint8)
    np.testing.assert_array_equal(hamming_search(query, docs, 4), [[0, 3, 1, 2]])
    np.testing.assert_array_equal(hamming_search(query, docs, 10), [[0, 3, 1, 2]])  # k beyond the corpus


def test_rescore_reranks_only_the_candidates():
    # q = (1, 0): doc0 (0, 1) -> 0; doc1 (1, 0) -> 1; doc2 (0.6, 0.8) -> 0.6
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    docs = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    # doc1, the best, is not a candidate: the best candidate is doc2
    np.testing.assert_array_equal(rescore(query, docs, np.array([[0, 2]]), 1), [[2]])
    np.testing.assert_array_equal(rescore(query, docs, np.array([[0, 1, 2]]), 2), [[1, 2]])


def test_top_k_agreement_same_sets_and_overlap():
    # q0: {1, 2} vs {2, 1} -> same, overlap 1; q1: {3, 4} vs {3, 5} -> not same, overlap 1/2
    same, overlap = top_k_agreement(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]]))
    assert same == pytest.approx(0.5) and overlap == pytest.approx(0.75)
