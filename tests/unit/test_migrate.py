"""jobs.migrate's parts without Milvus or Ray: flags, records, gate arithmetic, the service's alias refresh."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import numpy as np
import pytest

from jobs.migrate import _resumable, main, parse_config
from reembed.config import ServiceConfig
from reembed.errors import ConfigError
from reembed.gate import (
    ExpectedRows,
    GateThresholds,
    _check,
    exact_top_k,
    expected_rows_of,
    first_sentence,
    given_golden_queries,
    rows_vs_input_check,
    sampled_golden_queries,
)
from reembed.quantize import decode_rerank_vectors, encode_rerank_vectors
from reembed.store import F_RERANK
from reembed.versions import AliasRecord, VersionRecord, VersionRegistry, parse_version, version_collection
from serve.service import IDLE_REFRESH_FACTOR, SearchService
from tests.conftest import write_jsonl
from tests.unit.test_service import make_target


def test_flags_choose_one_action_and_thresholds_can_be_turned_off(tmp_path):
    cfg = parse_config(["--alias", "docs", "--input", "c.jsonl", "--to-model", "m", "--switch"])
    assert cfg.action == "build" and cfg.switch and cfg.gate_min_ann_recall == 0.95
    cfg = parse_config(["--alias", "docs", "--status"])
    assert cfg.action == "status"
    cfg = parse_config(["--alias", "docs", "--keep", "2"])
    assert cfg.action == "keep"
    cfg = parse_config(
        ["--alias", "d", "--input", "c", "--to-model", "m", "--gate-max-ndcg-drop", "off", "--gate-min-overlap", "0.1"]
    )
    assert cfg.gate_max_ndcg_drop is None and cfg.gate_min_overlap == 0.1 and cfg.gate_max_search_p95_ms == 250.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alias", "docs"], "nothing to do"),
        (["--alias", "docs", "--input", "c.jsonl"], "to_model"),
        (["--alias", "docs", "--status", "--rollback"], "expected one of"),
        (["--alias", "docs", "--rollback", "--keep", "1"], "takes no input"),
        (["--alias", "docs", "--keep", "1", "--switch"], "switch_to"),
        (["--alias", "1docs", "--status"], "alias"),
        (["--alias", "docs", "--input", "c", "--to-model", "m", "--qrels", "q.tsv"], "qrels"),
        (["--alias", "docs", "--input", "c", "--to-model", "m", "--queries", "/no/such.jsonl"], "queries"),
        (["--alias", "docs", "--input", "c", "--to-model", "m", "--gate-min-ann-recall", "2"], "gate_min_ann_recall"),
    ],
)
def test_bad_flags_fail_with_the_field_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_bad_input_fails_before_milvus_is_touched(tmp_path, capsys):
    db = tmp_path / "m.db"
    code = main(
        ["--alias", "docs", "--input", str(tmp_path / "none.jsonl"), "--to-model", "m", "--milvus-uri", str(db)]
    )
    assert code == 2
    assert "does not exist" in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert not db.exists()  # no Milvus Lite was started, no record written
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "1", "text": "a document"}])
    code = main(
        ["--alias", "docs", "--input", str(corpus), "--to-model", str(tmp_path / "nomodel"), "--milvus-uri", str(db)]
    )
    assert code == 2 and not db.exists()


def test_records_round_trip_and_version_names():
    record = VersionRecord(alias="docs", version=3, collection=version_collection("docs", 3), state="ready", model="m",
                           precision="int8", gate={"passed": True, "failed_checks": []}, rows=10)  # fmt: skip
    assert record.collection == "docs_v3" and parse_version("docs", "docs_v3") == 3
    assert parse_version("docs", "docs_v3x") is None and parse_version("docs", "other_v3") is None
    again = VersionRecord.from_json(record.to_json())
    assert again == record and again.summary()["gate"] == {"passed": True, "failed_checks": []}
    alias = AliasRecord(alias="docs", history=[1, 2, 3])
    assert (alias.target, alias.rollback_target) == (3, 2)
    assert AliasRecord.from_json(alias.to_json()) == alias


def test_only_the_newest_unfinished_build_of_the_same_model_is_resumed():
    def v(n, state, model="m", precision="int8", rerank=False):
        return VersionRecord(
            alias="a", version=n, collection=f"a_v{n}", state=state, model=model, precision=precision, rerank=rerank
        )

    assert _resumable({}, "m", "int8", False) is None
    assert _resumable({1: v(1, "serving"), 2: v(2, "failed")}, "m", "int8", False) == 2
    assert _resumable({1: v(1, "serving"), 2: v(2, "building")}, "m", "int8", False) == 2
    assert _resumable({1: v(1, "serving"), 2: v(2, "failed")}, "other", "int8", False) is None
    assert _resumable({1: v(1, "serving"), 2: v(2, "failed")}, "m", "float32", False) is None
    assert _resumable({1: v(1, "failed"), 2: v(2, "serving")}, "m", "int8", False) is None
    # A build with re-rank copies is another collection layout: never resumed into one without.
    assert _resumable({1: v(1, "serving"), 2: v(2, "failed")}, "m", "int8", True) is None
    assert _resumable({1: v(1, "serving"), 2: v(2, "failed", rerank=True)}, "m", "int8", True) == 2


def test_rerank_settings_of_a_migration(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "1", "text": "a"}])
    base = ["--alias", "docs", "--input", str(corpus), "--to-model", "m"]
    cfg = parse_config([*base, "--rerank"])
    assert cfg.rerank and cfg.backfill_settings("c", "u")["rerank"] is True
    binary = parse_config([*base, "--precision", "binary"])
    assert binary.rerank and binary.backfill_settings("c", "u")["precision"] == "binary"  # binary implies copies
    assert not parse_config(base).rerank
    with pytest.raises(ConfigError, match="rerank: float32 vectors are their own re-rank copies"):
        parse_config([*base, "--precision", "float32", "--rerank"])
    with pytest.raises(ConfigError, match="gate_rescore_multiplier"):
        parse_config([*base, "--gate-rescore-multiplier", "0"])


def test_first_sentence_and_sampled_queries(tmp_path):
    assert first_sentence("Lift on wings.  More text here.") == "Lift on wings."
    assert first_sentence("word " * 100).endswith("word") and len(first_sentence("word " * 100)) <= 200
    rows = [{"_id": str(i), "title": f"title number {i}", "text": "body"} for i in range(50)]
    rows.append({"_id": "x", "title": "", "text": "Falls back to the text. Not this."})
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    golden = sampled_golden_queries(str(corpus), "_id", ["title", "text"], 60, seed=1)
    assert len(golden.ids) == 51 and golden.source == "sampled"
    by_doc = {next(iter(golden.qrels[q])): t for q, t in zip(golden.ids, golden.texts, strict=True)}
    assert by_doc["7"] == "title number 7" and by_doc["x"] == "Falls back to the text."
    again = sampled_golden_queries(str(corpus), "_id", ["title", "text"], 10, seed=1)
    assert again == sampled_golden_queries(str(corpus), "_id", ["title", "text"], 10, seed=1)


def test_given_queries_keep_only_judged_ones(tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"_id": "1", "text": "a"}, {"_id": "2", "text": "b"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n2\td1\t1\n2\td2\t0\n9\td3\t1\n")
    golden = given_golden_queries(str(queries), str(tmp_path / "qrels.tsv"), 100, 0)
    assert golden.ids == ["2"] and golden.qrels == {"2": {"d1": 1}}
    assert given_golden_queries(str(queries), None, 1, 0).ids in (["1"], ["2"])
    (tmp_path / "bad.tsv").write_text("q\td\ts\n")
    with pytest.raises(ConfigError, match="header"):
        given_golden_queries(str(queries), str(tmp_path / "bad.tsv"), 100, 0)


def test_exact_top_k_streams_batches_like_one_search():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(57, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(57)]
    batches = [
        [{"id": ids[i], "vector": docs[i].tolist()} for i in range(start, min(start + 10, 57))]
        for start in range(0, 57, 10)
    ]
    got = exact_top_k(None, "c", queries, 7, batches=batches)
    want = [[ids[i] for i in row] for row in np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :7]]
    assert got == want
    codes = np.array([[-1, 2], [3, 4]], dtype=np.int8)  # int8 codes: exact integer inner products
    assert exact_top_k(
        None, "c", codes, 1, batches=[[{"id": "a", "vector": [1.0, 1.0]}, {"id": "b", "vector": [0.0, 1.0]}]]
    ) == [["b"], ["a"]]
    # Two-stage collections: exact search over the float16 re-rank copies, not the codes.
    copies = encode_rerank_vectors(docs / np.linalg.norm(docs, axis=1, keepdims=True))
    rerank_batches = [[{"id": ids[i], F_RERANK: copies[i]} for i in range(57)]]
    got = exact_top_k(None, "c", queries, 7, batches=rerank_batches, rerank_dimension=8)
    unit = decode_rerank_vectors(copies, 8)
    assert got == [[ids[i] for i in row] for row in np.argsort(-(queries @ unit.T), axis=1, kind="stable")[:, :7]]


def test_checks_name_value_and_threshold():
    assert _check("x", 0.9, ">=", 0.95)["passed"] is False
    assert _check("x", 0.9, ">=", 0.95)["threshold"] == ">= 0.95"
    assert _check("x", 10.0, "<=", 250.0)["passed"] is True
    assert _check("x", 0.1, ">=", None)["passed"] is None  # off: reported, never fails
    assert GateThresholds().min_overlap is None  # models differ legitimately: off by default


def test_service_keeps_its_pair_until_the_new_model_is_loaded():
    """A stale target is re-read in the background; requests go on with the old pair meanwhile, and
    the new pair is used only once the embedder has loaded its model."""
    old = make_target()
    new = replace(old, collection="docs_v2", model={**old.model, "name": "m2", "dimension": 8}, model_key="m2@bbbb/8")
    loaded = asyncio.Event()
    checked = []

    async def check(model):
        checked.append(model["name"])
        await loaded.wait()
        return {}

    async def scenario():
        # Stale after 0.2 s; re-read in the foreground only after 5 x 0.2 s, well past this scenario.
        svc = SearchService(ServiceConfig(milvus_uri="http://127.0.0.1:1", identity_refresh_s=0.2), None, check)

        async def resolve(fn):
            return replace(new, resolved_at=time.monotonic())

        svc._milvus = resolve
        svc._target = replace(old, resolved_at=time.monotonic())
        svc._checked_models.add(old.model_key)
        await asyncio.sleep(0.25)  # the old pair is stale now
        assert (await svc.target()).collection == "docs"  # answered at once, a refresh starts
        await asyncio.sleep(0.05)
        assert checked == ["m2"] and (await svc.target()).collection == "docs"  # still loading the new model
        loaded.set()
        await asyncio.sleep(0.05)
        got = await svc.target()
        assert got.collection == "docs_v2" and got.model_key == "m2@bbbb/8"
        svc.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def test_service_rereads_a_long_idle_pair_before_answering():
    """After an idle spell longer than IDLE_REFRESH_FACTOR intervals the pair may be several
    switches old (its collection dropped since): the first request waits for the re-read."""
    old = make_target()
    new = replace(old, collection="docs_v3")

    async def check(model):
        return {}

    async def scenario():
        svc = SearchService(ServiceConfig(milvus_uri="http://127.0.0.1:1", identity_refresh_s=0.01), None, check)

        async def resolve(fn):
            return replace(new, resolved_at=time.monotonic())

        svc._milvus = resolve
        svc._checked_models.add(old.model_key)
        svc._target = replace(old, resolved_at=time.monotonic() - IDLE_REFRESH_FACTOR * 0.01 - 1)
        got = await svc.target()
        assert got.collection == "docs_v3"  # not the idle pair, not even once
        svc.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def _summary(read=100, rejected=2, skipped=0, whole=None):
    out = {"read": read, "rejected": rejected, "shards": {"total": 4, "read": 4 - skipped, "skipped": skipped}}
    if whole is not None:
        out["input"] = whole
    return out


def test_the_rows_a_version_must_hold_come_from_the_whole_input_on_every_run():
    whole = {"rows": 103, "documents": 98, "rejected": 3, "complete": True}
    # The summary's whole-input count wins, whatever this run read or skipped, over any recorded one.
    for skipped, read in ((0, 103), (4, 0), (2, 50)):
        got = expected_rows_of(_summary(read=read, rejected=0, skipped=skipped, whole=whole), recorded=7)
        assert got.count == 98 and "whole input" in got.note
    assert expected_rows_of(_summary(whole={**whole, "documents": 0}), None).count == 0  # an empty input
    # Older summaries without `input`: this run's read, only when it skipped no shard.
    assert expected_rows_of(_summary(read=100, rejected=2, skipped=0), recorded=None).count == 98
    assert expected_rows_of(_summary(read=100, rejected=2, skipped=0), recorded=50).count == 98
    # A rerun that skipped shards: the count an earlier run kept in the version's record.
    got = expected_rows_of(_summary(read=0, rejected=0, skipped=4), recorded=98)
    assert got.count == 98 and "earlier run" in got.note


def test_an_unknown_expected_count_is_said_so_and_never_lets_the_gate_pass():
    # A record written before input_documents was kept, a rerun that skipped shards, an old summary.
    old_record = expected_rows_of(_summary(read=0, rejected=0, skipped=4), recorded=None)
    assert old_record.count is None and "written before input_documents was kept" in old_record.note
    partial = expected_rows_of(_summary(whole={"rows": 10, "documents": 9, "rejected": 1, "complete": False}), 98)
    assert partial.count is None and "not read whole" in partial.note
    broken = expected_rows_of(_summary(whole={"rows": 10, "complete": True}), 98)
    assert broken.count is None and "input.documents is None" in broken.note
    for expected in (old_record, partial, broken):
        check = rows_vs_input_check(98, expected)
        assert check["passed"] is False and check["note"] == expected.note and "unknown" in check["threshold"]


def test_rows_vs_input_passes_on_the_exact_count_only():
    expected = ExpectedRows(100, "the input's good unique documents")
    assert rows_vs_input_check(100, expected)["passed"] is True
    for rows in (99, 101, 0):
        check = rows_vs_input_check(rows, expected)
        assert check == {
            "name": "rows_vs_input", "value": rows, "threshold": "== 100", "passed": False, "note": expected.note
        }  # fmt: skip


def test_records_keep_the_input_document_count_and_older_records_read_as_unknown():
    record = VersionRecord(alias="docs", version=2, collection="docs_v2", state="failed", model="m",
                           precision="int8", rows=95, input_documents=100)  # fmt: skip
    again = VersionRecord.from_json(record.to_json())
    assert again.input_documents == 100 and again.summary()["input_documents"] == 100
    before = json.loads(record.to_json())
    del before["input_documents"]  # as written before the field existed
    assert VersionRecord.from_json(json.dumps(before)).input_documents is None


class _QueryRecorder:
    def __init__(self):
        self.filters = []

    def has_collection(self, name):
        return True

    def query(self, collection, filter_expr, output_fields):
        self.filters.append(filter_expr)
        return []


def test_registry_lookups_quote_the_alias_with_reembed_expr():
    store = _QueryRecorder()
    registry = VersionRegistry(store, "reg")
    assert registry.versions('d" or alias != "') == {}
    assert store.filters == ['alias == "d\\" or alias != \\""']
