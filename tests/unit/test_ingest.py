"""The job's per-batch steps called directly, as Ray would call them, against embedded Milvus Lite."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reembed.documents import (
    C_ID,
    C_PARTITION,
    C_RAW,
    C_REJECT,
    C_STATUS,
    C_TEXT,
    S_CHANGED,
    S_EOF,
    S_MOVED,
    S_NEW,
    S_REJECTED,
    S_UNCHANGED,
    DocumentSpec,
    end_of_shard,
    normalize_json_lines,
    with_shard,
)
from reembed.embedder import Encoded, describe_model
from reembed.errors import ReembedError, StoreUnavailableError
from reembed.ingest import (
    C_CLIPPED,
    C_PADDED,
    C_TOKENS,
    C_VECTOR,
    EMBED_STATUSES,
    REASON_MAX_CHARS,
    BatchWriter,
    ChangeDetector,
    DocumentEncoder,
)
from reembed.quantize import fit_int8
from reembed.store import CollectionIdentity, MilvusStore


def as_batch(lines, spec, shard="s#0-1"):
    table = with_shard(normalize_json_lines(lines, ["f"] * len(lines), spec), shard)
    return {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}


def by_kind(summary, kind):
    return [
        (p, n, w)
        for k, p, n, w in zip(summary["kind"], summary["partition"], summary["count"], summary["written"], strict=True)
        if k == kind
    ]


@pytest.fixture(scope="module")
def minilm():
    return describe_model("all-MiniLM-L6-v2")


def make_collection(uri, ident, cal, partitioning):
    store = MilvusStore(uri)
    identity = CollectionIdentity(
        model=ident.to_dict(),
        precision="int8",
        vector_type="FLOAT_VECTOR",
        calibration=cal.to_json(),
        partitioning=partitioning,
        hnsw={"M": 16, "efConstruction": 64},
    )
    store.create_collection("c", identity, 1000)
    return store, identity


def test_encoder_then_writer_upserts_good_rows_and_reports_rejects(tmp_path, minilm):
    lines = [json.dumps({"_id": f"d{i}", "text": f"document number {i} about wings"}) for i in range(5)]
    lines.append(json.dumps({"_id": "bad"}))
    batch = as_batch(lines, DocumentSpec(partitions=2))
    source, ident = minilm

    floats = DocumentEncoder(source, "int8", None, device="cpu")(batch)[C_VECTOR]
    assert floats.dtype == np.float32 and not floats[5].any()  # calibration mode: floats, reject zeroed
    # Fitted on two documents at a low quantile, the scale clips values of the other three.
    cal = fit_int8(floats[:2], "global", quantile=0.9)
    out = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")(batch)
    assert out[C_VECTOR].dtype == np.int8 and np.array_equal(out[C_VECTOR][:5], cal.quantize(floats[:5]))
    clipped = cal.clipped_per_row(floats[:5])
    assert clipped.sum() > 0 and out[C_CLIPPED].tolist() == [*clipped.tolist(), 0]  # the reject clips nothing

    uri = str(tmp_path / "unit.db")
    store, identity = make_collection(uri, ident, cal, {"scheme": "hash", "partitions": 2})
    summary = BatchWriter(uri, None, "c", "FLOAT_VECTOR", 1000)(out)
    written = by_kind(summary, S_NEW)
    assert sum(w for _, _, w in written) == 5 and {p for p, _, _ in written} <= {"part_0000", "part_0001"}
    assert sum(summary["clipped"]) == clipped.sum()  # per (shard, status, partition), summed by the driver
    # Token counts: the reject computes nothing; each text is padded to its own 16-multiple.
    assert out[C_TOKENS][5] == 0 and out[C_PADDED][5] == 0
    assert (out[C_PADDED][:5] == 16).all() and (out[C_TOKENS][:5] < 16).all()
    assert sum(summary["tokens"]) == out[C_TOKENS].sum() and sum(summary["padded_tokens"]) == 80
    rejected = [r for k, r in zip(summary["kind"], summary["reason"], strict=True) if k == S_REJECTED]
    assert len(rejected) == 1 and rejected[0].startswith("missing text")
    assert set(summary["shard"]) == {"s#0-1"}
    assert store.count("c") == 5
    assert store.read_identity("c") == identity


def test_change_detector_skips_unchanged_and_rewrites_changed_and_moved(tmp_path, minilm):
    """Same text and partition: unchanged, never embedded; other text: changed; other partition:
    moved: its copies deleted, then written anew, so that the id is stored once."""
    source, ident = minilm
    spec = DocumentSpec(partition_by="lang")
    docs = [{"_id": f"d{i}", "text": f"page {i} on swept wings", "lang": "en"} for i in range(4)]
    first = as_batch([json.dumps(d) for d in docs], spec)
    encoder = DocumentEncoder(source, "float32", None, device="cpu")
    cal = fit_int8(encoder(first)[C_VECTOR], "global")
    uri = str(tmp_path / "detect.db")
    store, _ = make_collection(uri, ident, cal, {"scheme": "field", "field": "lang"})
    encoder = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")
    writer = BatchWriter(uri, None, "c", "FLOAT_VECTOR", 1000)
    writer(encoder(first))
    stored_before = {r["id"]: r["vector"] for r in store.query("c", 'id != ""', ["id", "vector"])}

    docs[1]["text"] = "page 1, rewritten: delta wings"
    docs[2]["lang"] = "fr"
    docs.append({"_id": "d9", "text": "a brand new page", "lang": "en"})
    second = as_batch([json.dumps(d) for d in docs], spec)
    detector = ChangeDetector(uri, None, "c", per_partition=True)
    marked = detector(second)
    assert list(marked[C_STATUS]) == [S_UNCHANGED, S_CHANGED, S_MOVED, S_UNCHANGED, S_NEW]
    assert marked[C_TEXT][0] == "" and marked[C_TEXT][1]  # unchanged text is not carried on

    embedded = encoder(marked)
    assert not embedded[C_VECTOR][0].any() and embedded[C_VECTOR][1].any()  # the model skipped row 0
    summary = writer(embedded)
    assert sum(w for _, _, w in by_kind(summary, S_UNCHANGED)) == 0
    assert [(p, w) for p, _, w in by_kind(summary, S_MOVED)] == [("fr", 1)]
    rows = store.query("c", 'id != ""', ["id", "partition", "content_sha256", "vector"])
    assert sorted(r["id"] for r in rows) == ["d0", "d1", "d2", "d3", "d9"]  # d2 once, in "fr"
    assert {r["id"]: r["partition"] for r in rows}["d2"] == "fr"
    after = {r["id"]: r["vector"] for r in rows}
    assert np.array_equal(after["d0"], stored_before["d0"]) and not np.array_equal(after["d1"], stored_before["d1"])

    # A rerun of the same input finds nothing to do.
    assert set(ChangeDetector(uri, None, "c")(second)[C_STATUS]) == {S_UNCHANGED}
    # `--full` keeps the text and embeds unchanged rows too.
    full = ChangeDetector(uri, None, "c", keep_unchanged_text=True)(second)
    assert full[C_TEXT][0] and S_UNCHANGED not in EMBED_STATUSES


def test_bulk_stager_stages_parquet_and_reports_files_per_partition(tmp_path, minilm):
    """The stager returns the writer's summary (written = staged) plus one KIND_STAGED row per
    partition whose raw field lists the Parquet files; nothing reaches the collection itself."""
    from reembed.bulk import KIND_STAGED, BulkStager

    lines = [json.dumps({"_id": f"d{i}", "text": f"note {i} on boundary layers"}) for i in range(6)]
    lines.append(json.dumps({"_id": "bad"}))
    batch = as_batch(lines, DocumentSpec(partitions=2))
    source, ident = minilm
    floats = DocumentEncoder(source, "int8", None, device="cpu")(batch)[C_VECTOR]
    cal = fit_int8(floats[:6], "global")
    out = DocumentEncoder(source, "int8", cal.to_json(), device="cpu")(batch)
    uri = str(tmp_path / "bulk.db")
    store, _ = make_collection(uri, ident, cal, {"scheme": "hash", "partitions": 2})
    (tmp_path / "staging").mkdir()  # the driver makes the run's staging folder
    summary = BulkStager(uri, None, "c", 1000, str(tmp_path / "staging"))(out)
    assert sum(w for _, _, w in by_kind(summary, S_NEW)) == 6
    staged = {
        p: json.loads(raw)
        for k, p, raw in zip(summary["kind"], summary["partition"], summary["raw"], strict=True)
        if k == KIND_STAGED
    }
    assert set(staged) <= {"part_0000", "part_0001"} and all(staged.values())
    assert all(f.endswith(".parquet") and os.path.exists(f) for files in staged.values() for f in files)
    assert len({len(v) for v in summary.values()}) == 1  # every column has a value for every row
    assert store.count("c") == 0


# --- a bad row costs only itself: isolation in the encoder and the writer ----------------------
# A fake model and a fake store: these tests are about which rows fail, not about the model.

DIM = 8


class FakeEmbedder:
    """Embeds any text to a vector derived from its length; fails on a text holding `poison`."""

    dimension = DIM

    def __init__(self, poison="boom", error=ValueError):
        self.poison, self.error, self.calls = poison, error, []

    def encode_documents_counted(self, texts):
        self.calls.append(len(texts))
        for text in texts:
            if self.poison in text:
                raise self.error(f"cannot embed {text[:10]!r}")
        vectors = np.array([[len(t) % 7 + 1, 1, -1, 0.5, -2, 0, 1, -0.25] for t in texts], dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        tokens = np.array([len(t.split()) + 2 for t in texts], dtype=np.int32)
        return Encoded(vectors, tokens, np.full(len(texts), 16, dtype=np.int32))


class FakeStore:
    """Refuses (non-retriable, like MilvusStore._call) every upsert request holding a poisoned id."""

    def __init__(self, poison="refused", error=None, input_error=True):
        self.poison, self.error, self.input_error = poison, error, input_error
        self.rows, self.upserts, self.deleted = {}, [], []

    def ensure_partitions(self, collection, partitions):
        pass

    def upsert(self, collection, partition, rows):
        self.upserts.append(len(rows))
        if self.error is not None:
            raise self.error
        bad = [r["id"] for r in rows if self.poison in r["id"]]
        if bad:
            err = ReembedError(f"Milvus error during upsert: invalid row {bad[0]!r}")
            err.is_input_error = self.input_error  # as MilvusStore._call marks pymilvus' input errors
            raise err
        self.rows.update({r["id"]: (partition, r["text"]) for r in rows})
        return len(rows)

    def delete_before_rewrite(self, collection, ids):
        self.deleted.extend(ids)
        for i in ids:
            self.rows.pop(i, None)
        return len(ids)


def docs_batch(texts, shard="s#0-9", extra_lines=(), statuses=None):
    """A batch as the reader makes it: one good row per text, then `extra_lines`, then the eof row."""
    lines = [json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(texts)] + list(extra_lines)
    table = normalize_json_lines(lines, ["f"] * len(lines), DocumentSpec())
    table = pa.concat_tables([table, end_of_shard(shard, "f", len(lines))])
    batch = {k: np.array(v, dtype=object) for k, v in with_shard(table, shard).to_pydict().items()}
    if statuses:
        for i, status in statuses.items():
            batch[C_STATUS][i] = status
    return batch


def accounted(summary):
    """What the driver (RunProgress.consume) does with a summary: per shard, rows seen and expected;
    and the counts by kind, each rejected row once."""
    seen, expected, kinds = {}, {}, {}
    for kind, shard, count in zip(summary["kind"], summary["shard"], summary["count"], strict=True):
        if kind == S_EOF:
            expected[shard] = count
        else:
            seen[shard] = seen.get(shard, 0) + (1 if kind == S_REJECTED else count)
            kinds[kind] = kinds.get(kind, 0) + (1 if kind == S_REJECTED else count)
    assert seen == expected, (seen, expected)
    return kinds


def rejects_of(summary):
    return {
        doc_id: (reason, raw)
        for kind, doc_id, reason, raw in zip(
            summary["kind"], summary["id"], summary["reason"], summary["raw"], strict=True
        )
        if kind == S_REJECTED
    }


@pytest.mark.parametrize("precision", ["float32", "int8", "binary"])
def test_a_text_the_model_fails_on_is_one_reject_and_the_rest_is_embedded(precision):
    texts = ["first text", "this one goes boom", "third", "and boom again", "last one"]
    batch = docs_batch(texts, extra_lines=['{"_id": "x"}'], statuses={2: S_UNCHANGED})
    model = FakeEmbedder()
    cal = (
        fit_int8(model.encode_documents_counted(texts[:1]).vectors, "global").to_json() if precision == "int8" else None
    )
    model.calls.clear()
    out = DocumentEncoder.with_embedder(model, precision, cal)(batch)
    assert model.calls == [4, 1, 1, 1, 1]  # the batch, then each row alone; the unchanged row never
    assert list(out[C_STATUS]) == [S_NEW, S_REJECTED, S_UNCHANGED, S_REJECTED, S_NEW, S_REJECTED, S_EOF]
    assert out[C_REJECT][1] == "embed failed: ValueError: cannot embed 'this one g'"
    assert json.loads(out[C_RAW][1]) == {"id": "d1", "text": "this one goes boom"}
    good = FakeEmbedder().encode_documents_counted([texts[0], texts[4]])
    rows = [0, 4]
    if precision == "float32":
        assert np.array_equal(out[C_VECTOR][rows], good.vectors)  # as if the bad rows were never there
    assert out[C_VECTOR][[0, 4]].any(axis=1).all() and not out[C_VECTOR][[1, 3]].any()
    assert out[C_TOKENS].tolist() == [4, 0, 0, 0, 4, 0, 0] and out[C_CLIPPED][[1, 3]].tolist() == [0, 0]
    assert batch[C_STATUS][1] == S_NEW  # the input batch is left as it was

    summary = BatchWriter.with_store(FakeStore(), "c", "FLOAT_VECTOR", 1000)(out)
    assert accounted(summary) == {S_NEW: 2, S_UNCHANGED: 1, S_REJECTED: 3}
    assert set(rejects_of(summary)) == {"d1", "d3", "x"}


def test_a_model_that_fails_on_everything_raises_the_first_error():
    model = FakeEmbedder(poison="")  # fails on every text, a plain one included: the model, not the data
    with pytest.raises(ValueError, match="cannot embed 'a'"):
        DocumentEncoder.with_embedder(model, "float32", None)(docs_batch(["a", "b", "c"]))
    assert model.calls == [3, 1, 1, 1, 1]  # the batch, each row alone, then the plain text


def test_a_batch_whose_every_row_is_bad_is_rejected_when_the_model_still_works():
    # A batch of one bad row (or of bad rows only) is told from a broken model by a plain text.
    one = FakeEmbedder()
    out = DocumentEncoder.with_embedder(one, "float32", None)(docs_batch(["boom"]))
    assert out[C_STATUS][0] == S_REJECTED and out[C_REJECT][0].startswith("embed failed: ValueError")
    both = DocumentEncoder.with_embedder(FakeEmbedder(), "float32", None)(docs_batch(["boom 1", "boom 2"]))
    assert list(both[C_STATUS][:2]) == [S_REJECTED, S_REJECTED]


def test_a_reject_quotes_at_most_a_few_hundred_characters_of_the_error():
    model = FakeEmbedder(error=lambda m: ValueError("x" * 100_000 + "\ud800"))
    out = DocumentEncoder.with_embedder(model, "float32", None)(docs_batch(["ok", "boom"]))
    reason = out[C_REJECT][1]
    assert reason.startswith("embed failed: ValueError: xxx") and reason.endswith("x...")
    assert len(reason) == len("embed failed: ") + REASON_MAX_CHARS + len("...")


@pytest.mark.parametrize(
    "error",
    [MemoryError, lambda m: RuntimeError(f"CUDA out of memory. {m}"), lambda m: ValueError(f"Out of memory {m}")],
)
def test_out_of_memory_is_never_a_reject(error):
    model = FakeEmbedder(error=error)
    with pytest.raises(Exception) as raised:
        DocumentEncoder.with_embedder(model, "float32", None)(docs_batch(["ok", "boom", "fine"]))
    assert "emory" in f"{type(raised.value).__name__} {raised.value}" and model.calls == [3]


def test_rows_milvus_refuses_are_found_by_bisection_and_the_others_written():
    texts = [f"text {i}" for i in range(9)]
    batch = docs_batch(texts, statuses={5: S_MOVED, 6: S_MOVED})
    batch[C_ID][[2, 6]] = ["refused-2", "refused-6"]
    out = DocumentEncoder.with_embedder(FakeEmbedder(), "float32", None)(batch)
    store = FakeStore()
    summary = BatchWriter.with_store(store, "c", "FLOAT_VECTOR", 1000)(out)
    assert accounted(summary) == {S_NEW: 6, S_MOVED: 1, S_REJECTED: 2}
    assert sum(summary["written"]) == 7 and sorted(store.rows) == sorted(f"d{i}" for i in range(9) if i not in (2, 6))
    rejects = rejects_of(summary)
    assert set(rejects) == {"refused-2", "refused-6"}
    reason, raw = rejects["refused-6"]
    assert reason == "Milvus refused the row: Milvus error during upsert: invalid row 'refused-6'"
    assert json.loads(raw) == {"id": "refused-6", "text": "text 6"}
    # A moved row's copies go before it is written; one Milvus then refuses is a reject (its record
    # kept in rejects.jsonl), and the next run finds it absent and tries again.
    assert sorted(store.deleted) == ["d5", "refused-6"]
    assert len(store.upserts) <= 1 + 2 * 2 * 4  # bisection: about 2 log2(n) requests per refused row


def test_the_writer_raises_when_every_row_is_refused_but_not_as_bad_input_or_the_error_is_retriable():
    out = DocumentEncoder.with_embedder(FakeEmbedder(), "float32", None)(docs_batch(["a", "b"]))
    out[C_ID][:2] = ["refused-a", "refused-b"]
    store = FakeStore(input_error=False)
    with pytest.raises(ReembedError, match="invalid row 'refused-a'"):
        BatchWriter.with_store(store, "c", "FLOAT_VECTOR", 1000)(out)
    assert store.upserts == [2, 1, 1]
    # Refused alone as bad input (a group of one included): rejects, not a failed job.
    for ids in (["refused-a", "refused-b"], ["refused-a"]):
        out = DocumentEncoder.with_embedder(FakeEmbedder(), "float32", None)(docs_batch(["a", "b"][: len(ids)]))
        out[C_ID][: len(ids)] = ids
        summary = BatchWriter.with_store(FakeStore(), "c", "FLOAT_VECTOR", 1000)(out)
        assert sorted(i for k, i in zip(summary["kind"], summary["id"], strict=True) if k == S_REJECTED) == ids
        assert sum(summary["written"]) == 0
    out = DocumentEncoder.with_embedder(FakeEmbedder(), "float32", None)(docs_batch(["a", "b"]))
    down = StoreUnavailableError("Milvus unavailable during upsert: UNAVAILABLE")
    store = FakeStore(error=down)
    with pytest.raises(StoreUnavailableError) as raised:
        BatchWriter.with_store(store, "c", "FLOAT_VECTOR", 1000)(out)
    assert raised.value is down and store.upserts == [2]  # no bisection: retrying is MilvusStore's job


def test_control_characters_survive_into_the_stored_text(tmp_path, minilm):
    """Form feeds and tabs inside a text are embedded and stored as they are (real model, Milvus Lite)."""
    line = '{"_id": "pdf\\t1 ", "text": "page one\x0cpage\ttwo\x01end"}'
    batch = as_batch([line, json.dumps({"_id": "plain", "text": "page one page two end"})], DocumentSpec())
    source, ident = minilm
    embedded = DocumentEncoder(source, "float32", None, device="cpu")(batch)
    floats = embedded[C_VECTOR]
    assert np.isfinite(floats).all() and floats.any(axis=1).all()
    uri = str(tmp_path / "ctl.db")
    store, _ = make_collection(uri, ident, fit_int8(floats, "global"), {"scheme": "hash", "partitions": 1})
    summary = BatchWriter(uri, None, "c", "FLOAT_VECTOR", 1000)(embedded)
    assert sum(summary["written"]) == 2
    stored = {r["id"]: r["text"] for r in store.query("c", 'id != ""', ["id", "text"])}
    assert stored["pdf\t1 "] == "page one\x0cpage\ttwo\x01end"


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([S_NEW, S_NEW, S_MOVED, S_UNCHANGED, S_REJECTED]), st.booleans(), st.booleans()),
        min_size=1,
        max_size=10,
    ),
    partitions=st.sampled_from([1, 3]),
)
def test_every_row_is_counted_once_whatever_the_model_and_milvus_refuse(rows, partitions):
    """(status as read or detected, the model fails on its text, Milvus refuses it) per row: the
    summary accounts for each row once, or the step raises where every row it tried failed alone."""
    texts = [("boom " if poisoned else "") + f"text {i}" for i, (_, poisoned, _) in enumerate(rows)]
    batch = docs_batch(texts, statuses={i: status for i, (status, _, _) in enumerate(rows)})
    batch[C_PARTITION][: len(rows)] = [
        DocumentSpec(partitions=partitions).partition_for_id(f"d{i}") for i in range(len(rows))
    ]
    for i, (status, _, refused) in enumerate(rows):
        batch[C_REJECT][i] = "missing text: as read" if status == S_REJECTED else ""
        batch[C_ID][i] = f"refused-{i}" if refused else f"d{i}"
    embed = [i for i, (status, _, _) in enumerate(rows) if status in EMBED_STATUSES]
    failed = [i for i in embed if rows[i][1]]
    out = DocumentEncoder.with_embedder(FakeEmbedder(), "float32", None)(batch)
    to_write = [i for i in embed if i not in failed]
    groups = {}
    for i in to_write:
        groups.setdefault(batch[C_PARTITION][i], []).append(i)
    if any(all(rows[i][2] for i in group) for group in groups.values()):
        # Milvus refusing every row of a group alone without calling the input wrong: its fault.
        with pytest.raises(ReembedError, match="invalid row"):
            BatchWriter.with_store(FakeStore(input_error=False), "c", "FLOAT_VECTOR", 1000)(out)
    store = FakeStore()  # refusals Milvus calls input errors: each refused row is a reject
    writer = BatchWriter.with_store(store, "c", "FLOAT_VECTOR", 1000)
    summary = writer(out)
    refused = [i for i in to_write if rows[i][2]]
    kinds = accounted(summary)
    assert kinds.get(S_REJECTED, 0) == len([r for r in rows if r[0] == S_REJECTED]) + len(failed) + len(refused)
    assert sum(kinds.values()) == len(rows)
    rejected_ids = [i for k, i in zip(summary["kind"], summary["id"], strict=True) if k == S_REJECTED]
    assert len(rejected_ids) == len(set(rejected_ids))  # each once
    assert sorted(store.rows) == sorted(batch[C_ID][i] for i in to_write if i not in refused)
    assert sum(summary["written"]) == len(store.rows)
