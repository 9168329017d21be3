"""The backfill job with ids, texts and partition values drawn by hypothesis, on Milvus Lite and on
the Milvus server: after every run the collection is exactly the input, and the summary counts
exactly what changed.

Each example is a corpus of hand-picked tricky documents plus 8-25 drawn ones (ids and texts from
tests/strategies.py, a `group` field that partitions them), in two JSONL files: one written with
json.dumps(ensure_ascii=False), the other with ensure_ascii=True. The job runs six times on a fresh
collection: backfill, edits (and new documents) in one file, a rerun with nothing changed, removals
with delete_missing, partition moves (some with edits), and full=True. Only the files a step
changed are written again, so the resume record skips the other file's shards and the expected
`read` counts the documents of rewritten files only.

One run costs ~8 s here (Ray actors start for each), so an example costs ~50 s: one example per
backend. Failures are reported as found, not shrunk.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from jobs.backfill import run
from reembed.config import BackfillConfig
from reembed.documents import content_hash, partition_name_for_value
from reembed.store import F_HASH, F_ID, F_PARTITION, F_TEXT
from tests.conftest import open_store, read_jsonl
from tests.strategies import GROUPS, ids, texts

pytestmark = pytest.mark.integration

ID_FIELD, GROUP = "_id", "group"
# Each file in one of the two JSON forms: both are valid JSON for the same strings.
FILES = {"a.jsonl": False, "b.jsonl": True}  # file -> ensure_ascii
ABSENT = object()  # a text field left out of the record
# A run takes ~8 s; one that goes on for a minute is stuck (an endless loop is a failure to report).
RUN_DEADLINE_S = 90
EXAMPLES = 1  # drawn corpora per backend
_collections = itertools.count()


# --- the input ---------------------------------------------------------------------------------


def joined_text(record: dict[str, Any]) -> str:
    """The text the job embeds and hashes: the present text fields, stripped, joined with one space."""
    parts = [record.get(f) for f in ("title", "text")]
    return " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())


def partition_of(record: dict[str, Any]) -> str:
    return partition_name_for_value(str(record[GROUP]))


def _record(doc_id: str, title: Any, text: Any, group: Any) -> dict[str, Any]:
    record = {ID_FIELD: doc_id, GROUP: group}
    for name, value in (("title", title), ("text", text)):
        if value is not ABSENT:
            record[name] = value
    return record


_title = st.one_of(st.just(ABSENT), st.none(), st.just(""), st.just(" \x0c\t"), texts())
records = st.builds(_record, ids(), _title, st.one_of(texts(), st.none()), st.sampled_from(GROUPS)).filter(
    lambda r: joined_text(r) != ""
)

# Hand-picked documents every corpus starts with: the classes hypothesis draws, each at least once.
PINNED_DOCS = [
    {ID_FIELD: 'a" or id != "b', "title": "quotes", "text": "say \"hi\" and 'bye'", GROUP: "en-US"},
    {ID_FIELD: "x'] or id not in ['z", "text": "\x0cform\x0cfeed\x0c and\ttabs", GROUP: "en_US"},
    {ID_FIELD: "back\\slash\\", "text": "C:\\path\\to\\file", GROUP: "日本"},
    {ID_FIELD: "line\nbreak\r\n", "title": None, "text": "line\nbreak", GROUP: "a b"},
    {ID_FIELD: "nul\x00byte", "title": "", "text": "nul\x00inside", GROUP: "x'y"},
    {ID_FIELD: "emoji 😀👨\u200d👩\u200d👧", "text": "🎉 party 🇯🇵", GROUP: 'q"r'},
    {ID_FIELD: "日本語のID", "title": "漢字", "text": "中文 한국어 カタカナ", GROUP: "_default"},
    {ID_FIELD: "שלום مرحبا", "text": "\u202eRTL override\u202c and \u200f marks", GROUP: 7},
    {ID_FIELD: "e\u0301", "text": "combining accent", GROUP: "plain"},
    {ID_FIELD: "\u00e9", "text": "precomposed accent", GROUP: "plain"},
    {ID_FIELD: "\ufeffbom\u200bzero-width", "text": "\u2028separators\u2029\x85next line", GROUP: "Z9"},
    {ID_FIELD: " padded id ", "title": "  \t", "text": " padded text ", GROUP: "plain"},
    {ID_FIELD: " \t\n\u3000", "text": "an id of whitespace only", GROUP: "plain"},
    {ID_FIELD: "\\" * 512, "text": "an id of 512 backslashes", GROUP: "en-US"},
    {ID_FIELD: "😀" * 128, "text": "an id of 512 bytes of emoji", GROUP: "日本"},
    {ID_FIELD: "ctl\x01\x07\x1b\x7f", "text": "\x1c\x1d\x1e\x1f\x0b separators", GROUP: "a b"},
    {ID_FIELD: "\\u0041\\n", "text": "escapes that are not escapes", GROUP: "x'y"},
]
PINNED_IDS = {d[ID_FIELD] for d in PINNED_DOCS}
drawn_docs = st.lists(
    records.filter(lambda r: r[ID_FIELD] not in PINNED_IDS), min_size=8, max_size=25, unique_by=lambda r: r[ID_FIELD]
)


@dataclass
class Corpus:
    """The documents in input order, each in the file it was first written to."""

    docs: dict[str, dict[str, Any]]
    file_of: dict[str, str] = field(default_factory=dict)

    def lines(self, name: str) -> str:
        rows = [d for i, d in self.docs.items() if self.file_of[i] == name]
        return "".join(json.dumps(d, ensure_ascii=FILES[name]) + "\n" for d in rows)


@dataclass
class Input:
    """The corpus on disk: writes only the files whose text changed, and says which."""

    folder: Path
    written: dict[str, str] = field(default_factory=dict)

    def write(self, corpus: Corpus) -> set[str]:
        changed = set()
        for name in FILES:
            text = corpus.lines(name)
            if self.written.get(name) != text:
                (self.folder / name).write_text(text, encoding="utf-8")
                self.written[name] = text
                changed.add(name)
        return changed


# --- the collection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    partition: str
    content_sha256: str
    text: str


def stored_rows(uri: str, collection: str) -> tuple[dict[str, list[Stored]], int]:
    """Every row, partition by partition, and count(*). A query over the whole collection answers
    one row per id even where an id is stored in two partitions (Milvus 2.3 server; Milvus Lite
    once the old copy is flushed); one scoped to a partition shows each copy."""
    with open_store(uri) as store:
        out: dict[str, list[Stored]] = {}
        for partition in store.list_partitions(collection):
            rows = store.query(
                collection,
                f'{F_ID} != ""',
                [F_ID, F_PARTITION, F_HASH, F_TEXT],
                partition_names=[partition],
                limit=16384,
            )
            for r in rows:
                assert r[F_PARTITION] == partition, (
                    f"row {r[F_ID]!r} of partition {partition!r} says {r[F_PARTITION]!r}"
                )
                out.setdefault(r[F_ID], []).append(Stored(r[F_PARTITION], r[F_HASH], r[F_TEXT]))
        return out, store.count(collection)


def expected_rows(corpus: Corpus) -> dict[str, list[Stored]]:
    return {i: [Stored(partition_of(d), content_hash(joined_text(d)), joined_text(d))] for i, d in corpus.docs.items()}


def _short(value: Any) -> str:
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def assert_collection_is(uri: str, collection: str, corpus: Corpus, step: str) -> dict[str, list[Stored]]:
    got, total = stored_rows(uri, collection)
    want = expected_rows(corpus)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = {i: (got[i], want[i]) for i in set(got) & set(want) if got[i] != want[i]}
    if missing or extra or wrong:
        described = [
            f"  {_short(i)}: stored {[(c.partition, c.content_sha256[:8], _short(c.text)) for c in stored]}, "
            f"input {[(c.partition, c.content_sha256[:8], _short(c.text)) for c in wanted]}"
            for i, (stored, wanted) in wrong.items()
        ]
        raise AssertionError(
            f"after {step}: the collection is not the input: {len(missing)} missing ids "
            f"{[_short(i) for i in missing]}, {len(extra)} ids not in the input {[_short(i) for i in extra]}, "
            f"{len(wrong)} rows that differ:\n" + "\n".join(described)
        )
    assert total == len(want), f"after {step}: count(*) is {total}, the input has {len(want)} documents"
    return got


def expected_counts(
    before: dict[str, list[Stored]], corpus: Corpus, read_files: set[str], full: bool, deleted: int
) -> tuple[dict[str, int], dict[str, int]]:
    """The summary a run must give, and the rows it must write per partition: every document of a
    file read is new, changed, moved or unchanged against what the collection held before."""
    counts: Counter[str] = Counter()
    per_partition: Counter[str] = Counter()
    for i, d in corpus.docs.items():
        if corpus.file_of[i] not in read_files:
            continue
        copies = before.get(i)
        if not copies:
            status = "new"
        elif any(c.partition != partition_of(d) for c in copies):
            status = "moved"
        elif len(copies) == 1 and copies[0].content_sha256 == content_hash(joined_text(d)):
            status = "unchanged"
        else:
            status = "changed"
        counts[status] += 1
        if status != "unchanged" or full:
            per_partition[partition_of(d)] += 1
    written = sum(per_partition.values())
    summary = {
        "read": sum(counts.values()),
        "written": written,
        "embedded": written,
        "rejected": 0,
        "new": counts["new"],
        "changed": counts["changed"] + counts["moved"],  # the summary's `changed` includes the moves
        "moved": counts["moved"],
        "unchanged": counts["unchanged"],
        "deleted": deleted,
        "duplicate_ids": 0,
    }
    return summary, dict(sorted(per_partition.items()))


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail (TimeoutError in the main thread) a call that runs past `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"{what} ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Scenario:
    uri: str
    model: Path
    work: Path
    collection: str = ""
    state: dict[str, list[Stored]] = field(default_factory=dict)  # the collection after the last run
    timings: list[float] = field(default_factory=list)

    def step(self, name: str, corpus: Corpus, files: Input, *, full: bool = False, delete_missing: bool = False):
        first = not self.timings
        written_files = files.write(corpus)
        read_files = set(FILES) if full or first else written_files
        removed = len(set(self.state) - set(corpus.docs)) if delete_missing else 0
        cfg = BackfillConfig(
            input=str(files.folder),
            milvus_uri=self.uri,
            collection=self.collection,
            output_dir=str(self.work / "runs"),
            model=str(self.model),
            device="cpu",
            actors=1,  # one actor fewer to start per run: ~2 s of the ~10 s a run takes on 2 cores
            partition_by=GROUP,
            calibration_sample=16,
            full=full,
            delete_missing=delete_missing,
        )
        started = time.monotonic()
        with deadline(RUN_DEADLINE_S, f"the job's {name} run"):
            summary = run(cfg)
        self.timings.append(time.monotonic() - started)
        after = assert_collection_is(self.uri, self.collection, corpus, name)
        want, per_partition = expected_counts(self.state, corpus, read_files, full, removed)
        got = {k: summary.get(k) for k in want}
        assert got == want, f"{name}: the summary counts {got}, the collection changed by {want}"
        assert summary["partitions"] == per_partition, f"{name}: rows written per partition"
        assert read_jsonl(Path(summary["rejects_file"])) == [], f"{name}: rejects"
        count_change = sum(map(len, after.values())) - sum(map(len, self.state.values()))
        assert count_change == want["new"] - want["deleted"], f"{name}: count(*) changed by {count_change}"
        self.state = after


@dataclass(frozen=True)
class Plan:
    """What each step changes, as masks over the documents in input order (cut to their number)."""

    edited_file: str
    edits: list[bool]
    new_texts: list[str]
    added: list[dict[str, Any]]
    removals: list[bool]
    moves: list[bool]
    groups: list[Any]
    move_edits: list[bool]


MASK = len(PINNED_DOCS) + 25 + 3  # the most documents a corpus can have (pinned + drawn + added)
_mask = st.lists(st.booleans(), min_size=MASK, max_size=MASK)
plans = st.builds(
    Plan,
    edited_file=st.sampled_from(sorted(FILES)),
    edits=_mask,
    new_texts=st.lists(texts(), min_size=MASK, max_size=MASK),
    added=st.lists(records, max_size=3, unique_by=lambda r: r[ID_FIELD]),
    removals=_mask,
    moves=_mask,
    groups=st.lists(st.sampled_from(GROUPS), min_size=MASK, max_size=MASK),
    move_edits=_mask,
)


def chosen(items: list[str], mask: list[bool], most: int | None = None) -> list[str]:
    """The items the mask picks (the first one if it picks none), at most `most` of them."""
    picked = [i for i, m in zip(items, mask, strict=False) if m] or items[:1]
    return picked[:most] if most is not None else picked


def other_group(doc: dict[str, Any], wanted: Any) -> Any:
    """`wanted`, or the next group after it, whose partition differs from the document's."""
    start = GROUPS.index(wanted)
    for g in GROUPS[start:] + GROUPS[:start]:
        if partition_name_for_value(str(g)) != partition_of(doc):
            return g
    raise AssertionError("GROUPS maps to one partition only")


def edited(doc: dict[str, Any], field_name: str, value: str) -> dict[str, Any]:
    """`doc` with a new value in a text field, kept a document (a text that strips to nothing would
    make it a reject, which is not what these steps are about)."""
    new = {**doc, field_name: value}
    return new if joined_text(new) else {**doc, field_name: value + " edited"}


def run_scenario(scenario: Scenario, docs: list[dict[str, Any]], plan: Plan) -> None:
    scenario.collection = f"ids_{next(_collections)}_{int(time.time() * 1000) % 10**8}"
    folder = scenario.work / scenario.collection / "in"
    folder.mkdir(parents=True)
    files = Input(folder)
    names = sorted(FILES)
    corpus = Corpus({d[ID_FIELD]: d for d in docs}, {d[ID_FIELD]: names[k % 2] for k, d in enumerate(docs)})

    scenario.step("backfill", corpus, files)

    # Edits in one file, and new documents there.
    in_file = [i for i in corpus.docs if corpus.file_of[i] == plan.edited_file]
    for k, i in enumerate(chosen(in_file, plan.edits)):
        corpus.docs[i] = edited(corpus.docs[i], "text", plan.new_texts[k])
    for d in plan.added:
        if d[ID_FIELD] not in corpus.docs:
            corpus.docs[d[ID_FIELD]] = d
            corpus.file_of[d[ID_FIELD]] = plan.edited_file
    scenario.step("incremental run after edits", corpus, files)
    scenario.step("rerun with nothing changed", corpus, files)

    # Removals from both files, under the job's max_delete_fraction (0.5).
    for i in chosen(list(corpus.docs), plan.removals, most=len(corpus.docs) // 3):
        del corpus.docs[i]
    scenario.step("delete_missing run", corpus, files, delete_missing=True)

    # Partition moves, some with a new title as well.
    for k, i in enumerate(chosen(list(corpus.docs), plan.moves)):
        moved = {**corpus.docs[i], GROUP: other_group(corpus.docs[i], plan.groups[k])}
        corpus.docs[i] = edited(moved, "title", plan.new_texts[-1 - k]) if plan.move_edits[k] else moved
    scenario.step("incremental run after moves", corpus, files)

    scenario.step("full run", corpus, files, full=True)


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def backend(request, tmp_path_factory) -> tuple[str, Path]:
    work = tmp_path_factory.mktemp(f"ids-{request.param}")
    if request.param == "lite":
        return str(work / "m.db"), work
    return request.getfixturevalue("milvus_server"), work


def test_collection_is_the_input_after_every_run(backend, tiny_model, ray_local):
    uri, work = backend
    timings: list[float] = []
    failures: list[BaseException] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # each example runs the job six times: failures are not shrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=drawn_docs, plan=plans, salt=st.integers(0, 2**16))
    def check(drawn, plan, salt):
        # Hypothesis tries the simplest example first (ids "0", "1", ...): with a budget of one
        # run per backend, a drawn one is worth more.
        assume(salt != 0)
        scenario = Scenario(uri, tiny_model, work)
        try:
            run_scenario(scenario, PINNED_DOCS + drawn, plan)
        except Exception as exc:
            # Kept, not raised: hypothesis would run the whole scenario again to report it.
            exc.add_note(f"collection {scenario.collection!r}; drawn documents {drawn!r}; plan {plan!r}")
            failures.append(exc)
        finally:
            timings.extend(scenario.timings)

    started = time.monotonic()
    check()
    print(f"{len(timings)} job runs: {sum(timings):.1f} s of {time.monotonic() - started:.1f} s")
    if failures:
        raise failures[0]


# Rows that cannot become documents: each is a reject with a reason, and the job goes on.
BAD_ROWS = [
    '{"_id": "\\ud800lone", "text": "a lone high surrogate in the id", "group": "plain"}',
    '{"_id": "lone\\udfff", "text": "a lone low surrogate in the id", "group": "plain"}',
    '{"_id": "bad-text", "text": "a lone surrogate \\ud83d in the text", "group": "plain"}',
    '{"_id": "bad-title", "title": "\\udc00", "text": "and a good text", "group": "plain"}',
    '{"_id": "bad-group", "text": "a lone surrogate in the group", "group": "\\ud83d"}',
    json.dumps({ID_FIELD: "x" * 513, "text": "an id of 513 bytes", GROUP: "plain"}),
    json.dumps({ID_FIELD: "é" * 256 + "x", "text": "an id of 257 characters, 513 bytes", GROUP: "plain"}),
]


def run_on_lines(tmp_path: Path, model: Path, collection: str, lines: list[str]) -> tuple[BackfillConfig, dict]:
    """One job run over `lines` written as they are (UTF-8) to in/a.jsonl: its config and summary."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    cfg = BackfillConfig(
        input=str(folder),
        milvus_uri=str(tmp_path / "m.db"),
        collection=collection,
        output_dir=str(tmp_path / "runs"),
        model=str(model),
        device="cpu",
        actors=1,
        partition_by=GROUP,
        calibration_sample=16,
    )
    with deadline(RUN_DEADLINE_S, "the job"):
        return cfg, run(cfg)


def test_unstorable_values_are_rejects_and_the_rest_is_written(tmp_path, tiny_model, ray_local):
    """A JSON escape can spell a lone surrogate, which no Milvus string can hold (reembed.expr.unstorable):
    such rows, like blank and too long ids, are rejects with a reason; the job writes the others."""
    good = [d for d in PINNED_DOCS if d[GROUP] != "日本"]
    lines = [json.dumps(d) for d in good[:4]] + BAD_ROWS + [json.dumps(d) for d in good[4:]]
    cfg, summary = run_on_lines(tmp_path, tiny_model, "unstorable", lines)
    assert (summary["read"], summary["written"], summary["rejected"]) == (len(lines), len(good), len(BAD_ROWS))
    rejects = [json.loads(line) for line in Path(summary["rejects_file"]).read_bytes().decode("utf-8").splitlines()]
    assert len(rejects) == len(BAD_ROWS) and all(r["reason"] for r in rejects), rejects
    corpus = Corpus({d[ID_FIELD]: d for d in good}, dict.fromkeys((d[ID_FIELD] for d in good), "a.jsonl"))
    assert_collection_is(cfg.milvus_uri, cfg.collection, corpus, "a run with unstorable rows")


def test_utf8_jsonl_whose_records_all_hold_line_separators_is_read(tmp_path, tiny_model, ray_local):
    """JSONL ends lines with \\n only: U+2028, U+2029 and U+0085, which json.dumps(ensure_ascii=False)
    writes as they are, are characters of an id or a text, not line ends (str.splitlines() says otherwise)."""
    docs = [
        {ID_FIELD: f"{i}{sep}", "text": f"line{sep}separated", GROUP: "plain"}
        for i, sep in enumerate(["\u2028", "\u2029", "\x85", "\u2028\u2029\x85"])
    ]
    cfg, summary = run_on_lines(tmp_path, tiny_model, "separators", [json.dumps(d, ensure_ascii=False) for d in docs])
    assert (summary["read"], summary["written"], summary["rejected"]) == (len(docs), len(docs), 0)
    corpus = Corpus({d[ID_FIELD]: d for d in docs}, dict.fromkeys((d[ID_FIELD] for d in docs), "a.jsonl"))
    assert_collection_is(cfg.milvus_uri, cfg.collection, corpus, "a run over line separators")
