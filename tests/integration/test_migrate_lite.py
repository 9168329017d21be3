"""jobs.migrate end to end on Milvus Lite: MiniLM (384-d) to a tiny local model (32-d) through the
CLI, with the real backfill job, the gate on Cranfield queries and judgements, switch, rollback,
status and retention. The tests run in order and share one alias: each step starts where the
previous one left it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.migrate import EXIT_GATE_FAILED, main
from reembed.lite import LiteServer
from reembed.search import Searcher
from reembed.store import MilvusStore
from tests.conftest import read_jsonl, write_jsonl

pytestmark = pytest.mark.integration

N_DOCS = 100
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cranfield, ray_local, tiny_model):
    root = tmp_path_factory.mktemp("migrate")
    docs = read_jsonl(cranfield / "corpus.jsonl")[:N_DOCS]
    kept = {d["_id"] for d in docs}
    lines = (cranfield / "qrels" / "test.tsv").read_text().splitlines()
    judged = [line for line in lines[1:] if line.split("\t")[1] in kept and int(line.split("\t")[2]) > 0]
    qids = {line.split("\t")[0] for line in judged}
    (root / "qrels.tsv").write_text("\n".join([lines[0], *judged]) + "\n")
    write_jsonl(root / "queries.jsonl", [q for q in read_jsonl(cranfield / "queries.jsonl") if q["_id"] in qids])
    corpus = write_jsonl(root / "corpus.jsonl", docs)
    return {"root": root, "corpus": corpus, "db": root / "m.db", "tiny": tiny_model}


def migrate(setup, *argv: str, capsys) -> tuple[int, dict]:
    code = main(["--alias", "docs", "--milvus-uri", str(setup["db"]), *argv])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def build_args(setup, model: str, *extra: str) -> list[str]:
    return [
        "--input", str(setup["corpus"]), "--to-model", model, "--precision", "float32",
        "--output-dir", str(setup["root"] / "runs"), "--actors", "1", "--writers", "1", "--device", "cpu",
        "--gate-queries", "40", *extra,
    ]  # fmt: skip


def alias_target(setup) -> str | None:
    with LiteServer(str(setup["db"])) as uri:
        store = MilvusStore(uri)
        try:
            return store.alias_target("docs")
        finally:
            store.close()


def test_a_new_alias_gets_its_first_version(setup, capsys):
    # Version 1 is two-stage (int8 codes + float16 re-rank copies); the later ones are float32.
    args = build_args(setup, "all-MiniLM-L6-v2")
    args[args.index("float32")] = "int8"
    code, out = migrate(setup, *args, "--rerank", capsys=capsys)
    assert code == 0, out
    assert (
        out["version"] == 1 and out["collection"] == "docs_v1" and out["switched"] and out["alias_target"] == "docs_v1"
    )
    assert out["model"] == MINILM and out["dimension"] == 384 and out["rows"] == N_DOCS
    assert out["precision"] == "int8" and out["rerank"]
    gate = out["gate"]
    assert gate["passed"] and gate["queries"] == {"count": 40, "source": "sampled", "judged": True}
    # Gated the way the service searches it: codes, then the copies; recall against exact search
    # over the copies.
    assert gate["new"]["two_stage"] and gate["rescore_multiplier"] == 10
    checks = {c["name"]: c for c in gate["checks"]}
    recall = checks["ann_recall@10"]
    assert recall["value"] >= 0.95 and "exact over the re-rank copies" in recall["note"]
    assert checks["rows_vs_input"]["passed"] and checks["rows_vs_input"]["threshold"] == f"== {N_DOCS}"
    assert out["input_documents"] == N_DOCS  # kept with the version: a rerun's gate checks against it
    assert gate["new"]["ndcg@10"] > 0.5  # a title finds its own document
    assert alias_target(setup) == "docs_v1"


def test_a_failed_gate_leaves_the_alias_where_it_was(setup, capsys):
    qrels = ["--queries", str(setup["root"] / "queries.jsonl"), "--qrels", str(setup["root"] / "qrels.tsv")]
    code, out = migrate(setup, *build_args(setup, str(setup["tiny"]), *qrels, "--switch"), capsys=capsys)
    assert code == EXIT_GATE_FAILED
    assert out["version"] == 2 and not out["passed"] and not out["switched"]
    assert out["alias_target"] == "docs_v1" and alias_target(setup) == "docs_v1"
    assert out["dimension"] == 32 and out["rows"] == N_DOCS
    assert out["gate"]["old"]["two_stage"] and not out["gate"]["new"]["two_stage"]
    # The report names the failing check, its value and its threshold: a random model ranks far worse.
    (failed,) = out["gate"]["failed_checks"]
    assert failed.startswith("ndcg@10 = ") and "wanted >= " in failed
    assert out["gate"]["old"]["ndcg@10"] - out["gate"]["new"]["ndcg@10"] > 0.2
    assert out["gate"]["queries"]["source"] == "given"
    code, status = migrate(setup, "--status", capsys=capsys)
    v2 = status["versions"][1]
    assert v2["state"] == "failed" and v2["gate"]["passed"] is False and v2["dimension"] == 32
    code, out = migrate(setup, "--switch-to", "2", capsys=capsys)
    assert code == 2 and "did not pass its gate" in out["error"]


def test_a_version_missing_documents_fails_its_gate_on_every_plain_rerun(setup, capsys):
    """Rows lost after their shards went into the resume record (deleted here by hand) stay lost on a
    rerun, which skips those shards: the gate checks the version against the whole input's document
    count every time, not against what this run read, so the version cannot pass by being rerun."""
    lost = [d["_id"] for d in read_jsonl(setup["corpus"])[:5]]
    with LiteServer(str(setup["db"])) as uri:
        store = MilvusStore(uri)
        try:
            kept = store.fetch("docs_v2", lost, ["*"])
            assert len(kept) == len(lost)
            store.delete_ids("docs_v2", lost)
            store.flush("docs_v2")
        finally:
            store.close()
    # The next test's command, with only the input count left to catch the loss (no old-rows check).
    args = build_args(setup, str(setup["tiny"]), "--gate-max-ndcg-drop", "off", "--gate-max-row-diff", "off")
    for _ in range(2):
        code, out = migrate(setup, *args, "--switch", capsys=capsys)
        assert code == EXIT_GATE_FAILED, out
        assert out["version"] == 2 and out["resumed"] and not out["switched"] and alias_target(setup) == "docs_v1"
        shards = out["backfill"]["shards"]
        assert shards["skipped"] == shards["total"] and out["backfill"]["written"] == 0  # nothing read again
        assert out["backfill"]["input"]["documents"] == N_DOCS
        assert out["rows"] == N_DOCS - len(lost) and out["input_documents"] == N_DOCS
        assert out["gate"]["failed_checks"] == [f"rows_vs_input = {N_DOCS - len(lost)}, wanted == {N_DOCS}"]
    code, status = migrate(setup, "--status", capsys=capsys)
    v2 = status["versions"][1]
    assert (v2["state"], v2["rows"], v2["input_documents"]) == ("failed", N_DOCS - len(lost), N_DOCS)
    # Put the rows back as they were: the next test resumes this version whole.
    with LiteServer(str(setup["db"])) as uri:
        store = MilvusStore(uri)
        try:
            for row in kept:
                store.upsert("docs_v2", row["partition"], [row])
            store.flush("docs_v2")
            assert store.count("docs_v2") == N_DOCS
        finally:
            store.close()


def test_a_rerun_resumes_the_version_and_switches(setup, capsys):
    code, out = migrate(
        setup, *build_args(setup, str(setup["tiny"]), "--gate-max-ndcg-drop", "off", "--switch"), capsys=capsys
    )
    assert code == 0, out
    assert out["version"] == 2 and out["resumed"] and out["switched"] and out["alias_target"] == "docs_v2"
    assert out["backfill"]["written"] == 0  # the job found every document already written
    assert alias_target(setup) == "docs_v2"
    code, status = migrate(setup, "--status", capsys=capsys)
    assert code == 0
    assert status["target"] == "docs_v2" and status["target_version"] == 2 and status["rollback_version"] == 1
    v1, v2 = status["versions"]
    assert (v1["state"], v1["model"], v1["dimension"], v1["rows"]) == ("retired", MINILM, 384, N_DOCS)
    assert (v2["state"], v2["dimension"], v2["rows"], v2["precision"]) == ("serving", 32, N_DOCS, "float32")
    assert (v1["precision"], v1["rerank"], v2["rerank"]) == ("int8", True, False)
    assert v2["model"] == str(Path(setup["tiny"]).resolve()) and v2["gate"]["passed"]
    assert v1["build_seconds"] > 0 and v2["build_seconds"] > 0 and v2["started_at"] <= v2["finished_at"]
    # Neither the alias target nor the rollback target can be dropped.
    for version, why in (("2", "the alias points at it"), ("1", "rollback target")):
        code, out = migrate(setup, "--drop", version, capsys=capsys)
        assert code == 2 and why in out["error"]


def test_rollback_then_retention(setup, capsys):
    code, status = migrate(setup, "--rollback", capsys=capsys)
    assert code == 0 and status["target"] == "docs_v1" and alias_target(setup) == "docs_v1"
    assert [v["state"] for v in status["versions"]] == ["serving", "retired"]
    assert status["events"][-1]["event"] == "rollback"
    code, out = migrate(setup, "--rollback", capsys=capsys)
    assert code == 2 and "no earlier version" in out["error"]
    code, out = migrate(setup, "--keep", "0", capsys=capsys)  # the target always stays
    assert code == 0 and out["dropped"] == [2]
    assert [v["state"] for v in out["versions"]] == ["serving", "dropped"]
    code, out = migrate(setup, "--switch-to", "2", capsys=capsys)
    assert code == 2 and "dropped" in out["error"]
    assert alias_target(setup) == "docs_v1"
    # Back on the two-stage version: through the alias, the service's search path answers in two
    # stages, scored as cosines (those of the float embeddings, to float16's precision).
    with LiteServer(str(setup["db"])) as uri:
        store = MilvusStore(uri)
        try:
            searcher = Searcher(store, "docs", device="cpu")
            assert searcher.identity.rerank
            queries = [q["text"] for q in read_jsonl(setup["root"] / "queries.jsonl")[:5]]
            hits, _ = searcher.search(queries, k=3)
            embed = searcher.encoder.embedder.encode_queries
            for query, row in zip(queries, hits, strict=True):
                assert len(row) == 3 and row[0].score >= row[1].score >= row[2].score
                cosine = float(embed([query])[0] @ embed([row[0].fields["text"]])[0])
                assert abs(row[0].score - cosine) < 5e-3
        finally:
            store.close()


def test_binary_codes_are_refused_on_milvus_lite_before_a_version_is_recorded(setup, capsys):
    code, out = migrate(setup, *build_args(setup, "all-MiniLM-L6-v2", "--precision", "binary"), capsys=capsys)
    assert code == 2 and "BINARY_VECTOR" in out["error"]
    code, status = migrate(setup, "--status", capsys=capsys)
    assert [v["version"] for v in status["versions"]] == [1, 2]  # nothing recorded for the refused build
