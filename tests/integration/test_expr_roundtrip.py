"""Ids as Milvus expressions see them: every id hypothesis draws round-trips through Milvus Lite's
and the Milvus server's parsers (reembed/expr.py), and no id changes what an expression means.

One collection per backend, made once; each example upserts its ids beside fixed bystanders, finds
each of them by `id == <literal>`, `id in [...]` and the store's lookups (and nothing else), then
deletes a subset and moves another to a second partition, counting every row before and after.
Rows are read back partition by partition: a query over the whole collection shows one row per id
even where an id is stored twice. No Ray, no model: vectors are small constants.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from reembed.expr import all_of, equals, in_list, not_equals, string_literal, unstorable
from reembed.store import F_HASH, F_ID, F_PARTITION, F_TEXT, F_VECTOR, CollectionIdentity, MilvusStore
from tests.conftest import open_store
from tests.strategies import EXPRESSION_FRAGMENTS, ids, utf8_len

pytestmark = pytest.mark.integration

COLLECTION = "expr_roundtrip"
DIM = 4
P_A, P_B = "pa", "pb"
# Rows every example must leave alone: plain ids and ids that look like expressions themselves.
BYSTANDERS = {
    "bystander": P_A,
    "a": P_A,
    "b": P_B,
    "z": P_B,
    "\\": P_A,
    '"': P_B,
    "'": P_A,
    "x'] or id not in ['z": P_B,
    'a" or id != "b': P_A,
    "a\x00": P_B,
}
# Drawn examples per backend, besides the pinned ones: an example costs ~0.05 s on Milvus Lite and
# ~5 s on the server, whose Strong reads (all the store's own) wait ~0.2 s each for a time tick.
# Failures shrink on Lite only: on the server that would take minutes.
LITE_EXAMPLES = 100
SERVER_EXAMPLES = 3
MAX_IDS = 8


def identity() -> CollectionIdentity:
    return CollectionIdentity(
        model={"name": "constant-vectors", "dimension": DIM, "normalize": True},
        precision="float32",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        partitioning={"scheme": "field", "field": "group"},
        hnsw={"M": 8, "efConstruction": 16},
    )


def digest(doc_id: str, version: int = 0) -> str:
    """A content hash per (id, version): a row found under another id has another hash."""
    return hashlib.sha256(f"{version}:{doc_id}".encode()).hexdigest()


def row(doc_id: str, partition: str, version: int = 0) -> dict:
    return {
        F_ID: doc_id,
        F_VECTOR: np.full(DIM, 0.5, dtype=np.float32),
        F_TEXT: doc_id,  # the VARCHAR text field round-trips the same characters
        F_HASH: digest(doc_id, version),
        F_PARTITION: partition,
    }


def upsert(store: MilvusStore, partition: str, doc_ids: list[str], version: int = 0) -> None:
    assert store.upsert(COLLECTION, partition, [row(i, partition, version) for i in doc_ids]) == len(doc_ids)


def read(store: MilvusStore, expr: str, fields: list[str], partition: str | None = None) -> list[dict]:
    """Rows matching `expr`, read with Session consistency: ~2 ms on a server instead of a Strong
    read's ~0.2 s. On Milvus 2.3.5 such a read shows this client's upserts but not its deletes until
    a Strong read has waited for them, so every delete below is followed by a Strong `store.count`
    (the store's own reads are all Strong) before the next of these."""
    scope = {"partition_names": [partition]} if partition else {}
    return store.client.query(
        COLLECTION, filter=expr, output_fields=fields, consistency_level="Session", limit=16384, **scope
    )


def ids_where(store: MilvusStore, expr: str) -> list[str]:
    return [r[F_ID] for r in read(store, expr, [F_ID])]


def copies(store: MilvusStore) -> dict[str, list[tuple[str, str]]]:
    """Every stored row, partition by partition, as id -> sorted [(partition, hash), ...].

    A Milvus 2.3 server answers a query over the whole collection with one row per primary key
    even where the key is stored in two partitions; a query scoped to one partition (by name on
    the server, by the partition field on Milvus Lite, which ignores the names) sees each copy.
    No drawn id is part of these filters.
    """
    out: dict[str, list[tuple[str, str]]] = {}
    for partition in (P_A, P_B):
        for r in read(store, f'{F_PARTITION} == "{partition}"', [F_ID, F_PARTITION, F_HASH], partition):
            out.setdefault(r[F_ID], []).append((r[F_PARTITION], r[F_HASH]))
    return {k: sorted(v) for k, v in out.items()}


def sorted_values(found: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    return {k: sorted(v) for k, v in found.items()}


def drain(batches: Iterable[list[str]], rows: int) -> list[str]:
    """The ids of an iterator's batches, over `rows` stored rows. A batch may hold fewer rows than
    asked for, but never none before the end: more batches than rows means a batch came back twice
    (an endless loop), failed instead of waited on."""
    taken = list(itertools.islice(batches, rows + 2))
    assert len(taken) <= rows + 1, f"the iterator did not end: its first batches were {taken}"
    return list(itertools.chain.from_iterable(taken))


BYSTANDER_ROWS = {i: [(p, digest(i))] for i, p in BYSTANDERS.items()}


@contextlib.contextmanager
def _server_store(request) -> Iterator[MilvusStore]:
    store = MilvusStore(request.getfixturevalue("milvus_server"))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(
    scope="module",
    params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)],
)
def store(request, tmp_path_factory) -> Iterator[MilvusStore]:
    """One collection per backend, with the bystanders in it (flushed: sealed on a server)."""
    if request.param == "lite":
        ctx = open_store(str(tmp_path_factory.mktemp("expr-lite") / "m.db"))
    else:
        ctx = _server_store(request)
    with ctx as s:
        if s.has_collection(COLLECTION):
            s.drop_collection(COLLECTION)
        s.create_collection(COLLECTION, identity(), max_text_bytes=2048)
        s.ensure_partitions(COLLECTION, [P_A, P_B])
        for partition in (P_A, P_B):
            upsert(s, partition, [i for i, p in BYSTANDERS.items() if p == partition])
        s.flush(COLLECTION)
        assert s.count(COLLECTION) == len(BYSTANDERS)
        assert copies(s) == BYSTANDER_ROWS
        yield s
        if request.param == "server":
            s.drop_collection(COLLECTION)


id_lists = st.lists(ids().filter(lambda i: i not in BYSTANDERS), min_size=1, max_size=MAX_IDS, unique=True)
# Which drawn ids are deleted, and which of the others move to the second partition.
masks = st.lists(st.booleans(), min_size=MAX_IDS, max_size=MAX_IDS)
# Found by hand or by earlier runs; kept so that every run tries them.
PINNED = (
    # Quotes and backslashes, a trailing one among them: what broke pymilvus' query iterator, which
    # pages with an unescaped `id > "<last id>"`.
    ['b" or id != "', 'b\\"c', "b\\nz", "b\nc", "c\\", "\\u0041"],
    # NUL (as a C string would end), control characters, line separators, BOM, two forms of é.
    ["x\x00y", "x", "x\x00", "\r\n\t\x0c\x0b\x1c\x85\u2028", "\ufeff", "e\u0301", "\u00e9"],
    # 512 bytes: what the id field holds, in 1-, 2- and 4-byte characters, half of them escaped.
    ["\\" * 512, '"' * 512, "\U0001f600" * 128, "\u00e9" * 256],
)


def test_every_id_round_trips_through_expressions(store):
    on_server = not store.capabilities.is_lite
    examples = SERVER_EXAMPLES if on_server else LITE_EXAMPLES

    def check(drawn: list[str], deletes: list[bool], moves: list[bool]) -> None:
        try:
            _round_trip(store, drawn, deletes, moves)
        finally:
            # Leave only the bystanders, whatever failed, with a filter that names no drawn id (the
            # next example starts with a Strong read).
            store.client.delete(COLLECTION, filter=f"not ({in_list(F_ID, BYSTANDERS)})")

    check = given(drawn=id_lists, deletes=masks, moves=masks)(check)
    for pinned in PINNED:
        check = example(drawn=pinned, deletes=[k % 3 == 1 for k in range(MAX_IDS)], moves=[True] * MAX_IDS)(check)
    settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.large_base_example],
        phases=[Phase.explicit, Phase.generate] if on_server else list(Phase),
    )(check)()


def _round_trip(store: MilvusStore, drawn: list[str], deletes: list[bool], moves: list[bool]) -> None:
    before = store.count(COLLECTION)
    assert before == len(BYSTANDERS) and copies(store) == BYSTANDER_ROWS, "the last example left rows behind"
    upsert(store, P_A, drawn)
    if store.capabilities.is_lite:
        # Sealed, as the job leaves its rows after each run: on Milvus Lite an upsert into another
        # partition replaces a row of a growing segment, but not one of a sealed segment. (The
        # server keeps both copies either way, and a flush there costs ~2.5 s.)
        store.flush(COLLECTION)
    assert store.count(COLLECTION) == before + len(drawn)
    expected = {**BYSTANDER_ROWS, **{i: [(P_A, digest(i))] for i in drawn}}
    assert copies(store) == expected, "an id was not stored as drawn"

    # The store's lookups find exactly the drawn ids, each once, and nothing else.
    assert sorted_values(store.stored_versions(COLLECTION, drawn)) == {i: expected[i] for i in drawn}
    fetched = store.fetch(COLLECTION, drawn, [F_TEXT, F_HASH, F_PARTITION])
    assert sorted(r[F_ID] for r in fetched) == sorted(drawn)
    assert all(r[F_TEXT] == r[F_ID] and r[F_HASH] == digest(r[F_ID]) for r in fetched), "a text changed"

    # Expressions built by reembed.expr match exactly what they say.
    for doc_id in drawn:
        assert ids_where(store, equals(F_ID, doc_id)) == [doc_id], f"id == {string_literal(doc_id)}"
    everyone = [*drawn, *BYSTANDERS]
    assert sorted(r[F_ID] for r in store.query(COLLECTION, in_list(F_ID, drawn), [F_ID])) == sorted(drawn)
    assert sorted(ids_where(store, in_list(F_ID, everyone))) == sorted(everyone)
    assert sorted(ids_where(store, all_of(in_list(F_ID, drawn), not_equals(F_ID, drawn[0])))) == sorted(drawn[1:])
    assert sorted(ids_where(store, f"not ({in_list(F_ID, drawn)})")) == sorted(BYSTANDERS)
    assert ids_where(store, in_list(F_ID, [])) == []

    # delete_ids removes exactly the chosen subset.
    doomed = [i for i, d in zip(drawn, deletes, strict=False) if d]
    assert store.delete_ids(COLLECTION, doomed) == len(doomed)
    survivors = [i for i in drawn if i not in doomed]
    expected = {i: v for i, v in expected.items() if i not in doomed}
    assert store.count(COLLECTION) == before + len(survivors)
    assert copies(store) == expected, "delete_ids removed other rows or missed one"
    assert store.stored_versions(COLLECTION, doomed) == {}

    # A stale copy, as a crash mid-move or an older reembed could leave one: the same ids written to
    # another partition. Every copy is found when each partition is asked.
    movers = [i for i, m in zip(survivors, moves, strict=False) if m]
    upsert(store, P_B, movers, version=1)
    stored = copies(store)
    # A server keeps the old copy beside the new one (an upsert replaces a row within its
    # partition only); Milvus Lite replaces it.
    assert all(
        (P_B, digest(i, 1)) in stored[i] and set(stored[i]) <= {(P_A, digest(i)), (P_B, digest(i, 1))} for i in movers
    )
    versions = sorted_values(store.stored_versions(COLLECTION, movers, [P_A, P_B]))  # compared below
    # The move as the job's writer makes it: every copy deleted, then the new one written.
    assert store.delete_before_rewrite(COLLECTION, movers) == len(movers)
    upsert(store, P_B, movers, version=1)
    assert store.count(COLLECTION) == before + len(survivors)
    expected.update({i: [(P_B, digest(i, 1))] for i in movers})
    assert copies(store) == expected, "a move left a stale copy or removed other rows"
    assert ids_where(store, all_of(in_list(F_ID, movers), equals(F_PARTITION, P_A))) == []

    # Checked last, so that their failures do not hide the ones above.
    assert versions == {i: stored[i] for i in movers}, "stored_versions did not report every stored copy"
    for partition in (P_A, P_B):
        in_partition = [i for i, v in expected.items() if v[0][0] == partition]
        found = drain(store.iter_ids(COLLECTION, partition=partition), len(in_partition))
        assert sorted(found) == sorted(in_partition), partition
    assert sorted(drain(store.iter_ids(COLLECTION), len(expected))) == sorted(expected)


# --- the literal itself: no Milvus needed -------------------------------------------------------

_DECODE = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "r": "\r", "t": "\t"}


def read_literal(literal: str) -> str:
    """Read a literal back the way both parsers do for the escapes string_literal writes (strict:
    a raw double quote, CR or LF inside, or an unknown escape, is an error)."""
    assert literal[0] == '"' and literal[-1] == '"', literal
    out, chars = [], iter(literal[1:-1])
    for c in chars:
        assert c not in '"\r\n', f"raw {c!r} inside {literal!r}"
        if c == "\\":
            nxt = next(chars)
            assert nxt in _DECODE, f"unknown escape \\{nxt} in {literal!r}"
            out.append(_DECODE[nxt])
        else:
            out.append(c)
    return "".join(out)


@pytest.mark.parametrize("value", [*EXPRESSION_FRAGMENTS, '\\\\"', 'a"\\', "\x00\n\r\t\x7f"])
def test_literal_reads_back_as_the_value(value):
    assert read_literal(string_literal(value)) == value


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(a=ids(), b=ids())
def test_string_literal_is_injective_and_reads_back(a, b):
    assert read_literal(string_literal(a)) == a
    assert (string_literal(a) == string_literal(b)) == (a == b)
    assert equals(F_ID, a) == f"{F_ID} == {string_literal(a)}"


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    before=st.text(max_size=5),
    surrogate=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    after=st.text(max_size=5),
)
def test_lone_surrogates_are_unstorable(before, surrogate, after):
    value = before + surrogate + after
    reason = unstorable(value)
    assert reason is not None and "surrogate" in reason
    with pytest.raises(ValueError, match="surrogate"):
        string_literal(value)
    with pytest.raises(ValueError):
        in_list(F_ID, ["fine", value])


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(value=ids())
def test_valid_unicode_is_storable(value):
    assert unstorable(value) is None
    assert utf8_len(value) <= 512


def test_iter_ids_sees_the_rows_just_written(store):
    """The store's reads are Strong: a scan right after an upsert sees it, as every lookup does."""
    fresh = ["just written", 'with "quotes"', "and\\backslashes\\"]
    assert store.count(COLLECTION) == len(BYSTANDERS)  # a Strong read: earlier deletes are applied
    try:
        upsert(store, P_B, fresh)
        found = drain(store.iter_ids(COLLECTION, partition=P_B), len(fresh) + len(BYSTANDERS))
        assert sorted(found) == sorted([*fresh, *(i for i, p in BYSTANDERS.items() if p == P_B)])
    finally:
        store.delete_ids(COLLECTION, fresh)
    assert store.count(COLLECTION) == len(BYSTANDERS)
