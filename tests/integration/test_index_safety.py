"""The index is never lost: real-world ids, damaged files, shrunken listings, resumes (real Ray, Milvus Lite).

Each case is one the issue "Never lose the index" reproduced on the job before it was fixed. The
model is the tiny random BERT (these tests are about bookkeeping, not about vectors); the checks
read the collection itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.backfill import parse_config, run
from reembed.documents import content_hash
from reembed.errors import ConfigError, InputDataError, root_cause
from reembed.store import F_HASH, F_ID, F_PARTITION
from tests.conftest import open_store, write_jsonl

pytestmark = pytest.mark.integration

TRICKY_IDS = [
    "x'] or id not in ['z",
    "z",
    "O'Brien",
    "Ender's_Game",
    'say "hi"',
    "back\\slash",
    "café",
    "doc-😀",
    "Ünïcödé-ß",
    "東京",
    "שלום",
    "tab\tnew\nline",
]


def docs_with(ids: list[str], n: int, tag: str = "") -> list[dict]:
    filler = [f"doc-{tag}{i}" for i in range(n - len(ids))]
    return [{"_id": i, "text": f"document {k} {tag} about wings and flow"} for k, i in enumerate(ids + filler)]


def backfill(tmp: Path, model: Path, input_path: Path, *extra: str) -> dict:
    argv = ["--input", str(input_path), "--milvus-uri", str(tmp / "m.db"), "--collection", "docs"]
    argv += ["--output-dir", str(tmp / "runs"), "--model", str(model), "--calibration-sample", "16", *extra]
    return run(parse_config(argv))


def stored(tmp: Path) -> dict[str, str]:
    with open_store(str(tmp / "m.db")) as store:
        rows = store.query("docs", f'{F_ID} != ""', [F_ID, F_HASH], limit=16384)
    assert len(rows) == len({r[F_ID] for r in rows}), "a document is stored twice"
    return {r[F_ID]: r[F_HASH] for r in rows}


def hashes(docs: list[dict]) -> dict[str, str]:
    return {d["_id"]: content_hash(d["text"]) for d in docs}


def test_quoted_and_unicode_ids_survive_edits_and_deletes(tmp_path, tiny_model, ray_local):
    docs = docs_with(TRICKY_IDS, 40)
    src = tmp_path / "in" / "docs.jsonl"
    with open(write_jsonl(src, []), "w") as fh:  # raw UTF-8, as most real corpora are written
        fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    first = backfill(tmp_path, tiny_model, src)
    assert first["written"] == 40 and first["input"]["documents"] == 40
    assert 0 <= first["census_seconds"] <= first["seconds"]
    assert stored(tmp_path) == hashes(docs)

    # The injection-shaped id leaves the input: only it may go (it once took 38 others with it).
    kept = [d for d in docs if d["_id"] != TRICKY_IDS[0]]
    for d in kept[:6]:
        d["text"] += " (edited)"  # edited texts put the non-ASCII ids through the change detector
    write_jsonl(src, kept)  # \u escapes this time: the same ids
    second = backfill(tmp_path, tiny_model, src, "--delete-missing")
    assert second["deleted"] == 1 and second["changed"] == 6 and second["unchanged"] == 33
    assert stored(tmp_path) == hashes(kept)

    full = backfill(tmp_path, tiny_model, src, "--full")
    assert full["written"] == 39 and full["deleted"] == 0
    assert stored(tmp_path) == hashes(kept)


def _damage_in_place(path: Path) -> None:
    """Bytes changed mid-file, size and mtime kept: a failing disk, a half-rewritten object."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_damaged_file_deletes_and_moves_nothing_and_is_named(tmp_path, tiny_model, ray_local):
    folder = tmp_path / "in"
    folder.mkdir()
    parts = {name: [{**d, "group": "g1"} for d in docs_with([], 40, tag=name)] for name in "abc"}
    for name, part in parts.items():
        pq.write_table(pa.Table.from_pylist(part), folder / f"{name}.parquet", compression="NONE")
    assert backfill(tmp_path, tiny_model, folder, "--partition-by", "group")["written"] == 120
    _damage_in_place(folder / "b.parquet")
    parts["a"][0]["group"] = "g2"  # a move, in a file that is read again
    pq.write_table(pa.Table.from_pylist(parts["a"]), folder / "a.parquet", compression="NONE")

    with pytest.raises(InputDataError) as failure:
        backfill(tmp_path, tiny_model, folder, "--partition-by", "group", "--delete-missing")
    message = str(failure.value)
    assert "b.parquet" in message.splitlines()[0] and "nothing was deleted" in message
    docs = [d for part in parts.values() for d in part]
    assert stored(tmp_path) == hashes(docs)  # all 120, the damaged file's 40 included
    with open_store(str(tmp_path / "m.db")) as store:
        moved = store.query("docs", f'{F_ID} == "{parts["a"][0]["_id"]}"', [F_PARTITION])
    assert [r[F_PARTITION] for r in moved] == ["g1"]  # not moved while part of the input is unreadable
    rejects = [json.loads(line) for line in sorted((tmp_path / "runs" / "docs").glob("*/rejects.jsonl"))[-1].open()]
    assert [r["id"] for r in rejects] == [parts["a"][0]["_id"]] and rejects[0]["reason"].startswith("move deferred")

    pq.write_table(pa.Table.from_pylist(parts["b"]), folder / "b.parquet", compression="NONE")  # repaired
    fixed = backfill(tmp_path, tiny_model, folder, "--partition-by", "group", "--delete-missing")
    assert fixed["moved"] == 1 and fixed["deleted"] == 0 and fixed["input"]["complete"]
    with open_store(str(tmp_path / "m.db")) as store:
        moved = store.query("docs", f'{F_ID} == "{parts["a"][0]["_id"]}"', [F_PARTITION])
    assert [r[F_PARTITION] for r in moved] == ["g2"]


def test_bad_characters_cost_only_their_rows(tmp_path, tiny_model, ray_local):
    lines = [json.dumps(d) for d in docs_with([], 58)]
    lines[0] = "\ufeff" + lines[0]  # a byte-order mark starts the file
    lines.append('{"_id": "surrogate-text", "text": "a\\ud800 b"}')  # valid JSON, not valid Unicode
    lines.append('{"_id": "id-\\udfff", "text": "fine"}')
    lines.append(json.dumps({"_id": "  spaced  ", "text": "page one\fpage two\tcolumn"}))
    src = tmp_path / "in" / "docs.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = backfill(tmp_path, tiny_model, src)
    assert summary["read"] == 61 and summary["written"] == 59 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {"bad text": 1, "bad id": 1}
    kept = stored(tmp_path)
    assert kept["  spaced  "] == content_hash("page one\fpage two\tcolumn") and "doc-0" in kept
    again = backfill(tmp_path, tiny_model, src)  # the bad rows never stop a rerun either
    assert again["written"] == 0 and again["shards"]["read"] == 0


def test_a_listing_that_lost_files_deletes_nothing(tmp_path, tiny_model, ray_local):
    folder = tmp_path / "in"
    big = docs_with([], 60, tag="big")
    write_jsonl(folder / "a.jsonl", big)
    small = {name: docs_with([], 2, tag=name) for name in ("b", "c")}
    for name, part in small.items():
        write_jsonl(folder / f"{name}.jsonl", part)
    backfill(tmp_path, tiny_model, folder)
    for name in small:  # a listing that came back short: 2 of 3 files, 4 of 64 documents
        (folder / f"{name}.jsonl").rename(tmp_path / f"{name}.jsonl")

    with pytest.raises(InputDataError, match=r"2 of the 3 input files .* not in the listing"):
        backfill(tmp_path, tiny_model, folder, "--delete-missing")
    assert stored(tmp_path) == hashes(big + small["b"] + small["c"])

    # Removed on purpose: the user says so, and exactly those documents go.
    done = backfill(tmp_path, tiny_model, folder, "--delete-missing", "--max-delete-fraction", "0.9")
    assert done["deleted"] == 4
    assert stored(tmp_path) == hashes(big)


def test_an_id_in_two_files_is_rejected_on_resume_as_in_one_run(tmp_path, tiny_model, ray_local):
    folder = tmp_path / "in"
    a = docs_with(["twice"], 10, tag="a")
    b = docs_with(["twice"], 10, tag="b")
    write_jsonl(folder / "a.jsonl", a)
    write_jsonl(folder / "b.jsonl", b)
    whole = backfill(tmp_path, tiny_model, folder)
    assert whole["rejected"] == 2 and whole["input"]["documents"] == 18
    assert "twice" not in stored(tmp_path)

    # a.jsonl is touched: only it is read again, b.jsonl is skipped as recorded. The repeated id is
    # still found across the whole input, so the resumed run rejects exactly what one run would.
    os.utime(folder / "a.jsonl", ns=(1, 1))
    resumed = backfill(tmp_path, tiny_model, folder)
    assert resumed["shards"]["skipped"] >= 1 and resumed["duplicate_ids"] == 1
    assert resumed["input"] == whole["input"]
    assert "twice" not in stored(tmp_path)
    assert set(stored(tmp_path)) == {d["_id"] for d in a + b} - {"twice"}


def test_max_text_bytes_above_the_collection_is_refused_before_any_work(tmp_path, tiny_model, ray_local):
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", docs_with([], 20))
    backfill(tmp_path, tiny_model, src, "--max-text-bytes", "1000")
    with pytest.raises(ConfigError, match=r"at most 1000 bytes.*got 2000"):
        backfill(tmp_path, tiny_model, src, "--max-text-bytes", "2000")
    # Without the flag a later run takes the collection's own length (its resume record stays valid).
    again = backfill(tmp_path, tiny_model, src)
    assert again["shards"]["read"] == 0 and again["shards"]["skipped"] >= 1 and again["written"] == 0
    assert again["input"]["documents"] == 20 and len(stored(tmp_path)) == 20


def test_a_failure_in_an_actor_is_named_by_its_cause_not_by_rays_advice(ray_local):
    import ray.data

    class Refuses:
        def __call__(self, batch):
            raise UnicodeEncodeError("utf-8", "a\ud800", 1, 2, "surrogates not allowed")

    data = ray.data.range(4).map_batches(Refuses, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1)
    with pytest.raises(Exception) as failure:
        data.take_all()
    assert "retry" in str(failure.value)  # Ray's advice is there ...
    assert root_cause(failure.value).startswith("UnicodeEncodeError: 'utf-8' codec can't encode")  # ... but not first
