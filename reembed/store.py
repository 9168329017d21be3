"""Milvus: what the server can do, the collection's schema and identity, partitions, upserts.

Sits at the end of the job's flow and at the start of the service's. The collection's
properties carry the model identity, the precision and the int8 calibration: the job writes
them once, every later run and the service read them back, so the two never disagree silently.

Capabilities come from the server's version: INT8_VECTOR needs Milvus >= 2.6, BINARY_VECTOR any
real server; Milvus Lite has FLOAT_VECTOR only. Where INT8_VECTOR is missing the same int8 codes
are stored in a FLOAT_VECTOR field, which ranks them identically (inner product of the codes).
Binary codes are never emulated: without BINARY_VECTOR that precision is refused.

A collection may keep re-rank copies of its vectors (float16, base64) in a VARCHAR field beside
compact codes: Milvus 2.3 allows one vector field per collection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from reembed.errors import CapabilityError, ConfigError, ModelMismatchError, ReembedError, StoreUnavailableError
from reembed.expr import all_of, equals, in_list, string_literal
from reembed.quantize import rerank_text_bytes

logger = logging.getLogger(__name__)

F_ID = "id"
F_VECTOR = "vector"
F_TEXT = "text"
F_HASH = "content_sha256"
F_PARTITION = "partition"
F_RERANK = "rerank_vector"
ID_MAX_BYTES = 512
PARTITION_MAX_CHARS = 255
IDENTITY_PROPERTY = "reembed.identity"
SCHEMA_VERSION = 1
DEFAULT_PARTITION = "_default"
# Keep one request well under Milvus's 64 MiB gRPC limit.
MAX_REQUEST_BYTES = 16 << 20
INT8_VECTOR_MIN_VERSION = (2, 6, 0)
# Ids per `id in [...]` lookup or delete: short expressions, few round trips.
LOOKUP_IDS_PER_QUERY = 1000
# Every row: a query iterator needs some filter on Milvus 2.3 (an empty one is refused there).
ALL_ROWS = f'{F_ID} != ""'
# Milvus 2.3 indexes binary vectors with BIN_FLAT or BIN_IVF_FLAT only (no graph index): exact
# Hamming search is the first stage of binary + re-rank.
BINARY_INDEX = "BIN_FLAT"

T = TypeVar("T")


@dataclass(frozen=True)
class ServerCapabilities:
    """What the connected server supports, read from its version string."""

    version: str
    is_lite: bool
    int8_vector: bool
    binary_vector: bool

    @classmethod
    def from_version(cls, version: str) -> ServerCapabilities:
        if version.startswith("milvus_lite"):
            return cls(version=version, is_lite=True, int8_vector=False, binary_vector=False)
        match = re.search(r"(\d+)\.(\d+)\.(\d+)", version)
        numbers = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
        return cls(
            version=version,
            is_lite=False,
            int8_vector=numbers >= INT8_VECTOR_MIN_VERSION,
            binary_vector=True,
        )

    def vector_type_for(self, precision: str) -> str:
        """The Milvus field type that holds vectors of `precision` on this server.

        Raises CapabilityError for binary codes on a server without BINARY_VECTOR (Milvus Lite).
        """
        if precision == "binary":
            if not self.binary_vector:
                raise CapabilityError(
                    f"binary codes need a BINARY_VECTOR field, which Milvus {self.version} does not have (Milvus "
                    "Lite stores FLOAT_VECTOR only); they are not emulated with floats. Use a Milvus server URI, "
                    "e.g. http://127.0.0.1:19530 from `milvus-server --data DIR` (pip install milvus==2.3.5)"
                )
            return "BINARY_VECTOR"
        if precision == "int8" and self.int8_vector:
            return "INT8_VECTOR"
        return "FLOAT_VECTOR"

    def fallback_note(self, precision: str) -> str | None:
        if precision == "int8" and not self.int8_vector:
            return (
                f"Milvus {self.version} has no INT8_VECTOR (needs Milvus >= "
                f"{'.'.join(map(str, INT8_VECTOR_MIN_VERSION))}): storing the int8 codes in a FLOAT_VECTOR "
                "field; search compares the same codes by inner product, so ranking is identical, "
                "memory is that of float32"
            )
        return None


@dataclass(frozen=True)
class CollectionIdentity:
    """Everything a collection binds: the model, how vectors were made, how rows are partitioned."""

    model: dict[str, Any]
    precision: str
    vector_type: str
    calibration: str | None  # Int8Calibration.to_json(), None for float32
    partitioning: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    hnsw: dict[str, int] = field(default_factory=dict)
    rerank: str | None = None  # encoding of the re-rank copies in F_RERANK (quantize.RERANK_ENCODING), if any

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CollectionIdentity:
        return cls(**json.loads(text))

    def differences(self, other: CollectionIdentity) -> list[str]:
        """What differs in the parts that must match (calibration and HNSW params are inherited)."""
        diffs = []
        for key in ("name", "weights_sha256", "dimension", "normalize"):
            a, b = self.model.get(key), other.model.get(key)
            if a != b:
                diffs.append(f"model.{key}: collection has {a!r}, this run has {b!r}")
        # An int8 backend computes another function than torch; the dtype only rounds differently
        # (reembed.embedder.ModelIdentity), so it is not compared.
        a, b = self.model.get("backend", "torch"), other.model.get("backend", "torch")
        if a != b:
            diffs.append(f"model.backend: collection has {a!r}, this run has {b!r}")
        for key in ("precision", "partitioning", "schema_version", "rerank"):
            a, b = getattr(self, key), getattr(other, key)
            if a != b:
                diffs.append(f"{key}: collection has {a!r}, this run has {b!r}")
        return diffs


_SCALAR_KINDS = {
    "VARCHAR": "string",
    **{t: "number" for t in ("INT8", "INT16", "INT32", "INT64", "FLOAT", "DOUBLE")},
}


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    identity: CollectionIdentity | None
    scalar_fields: dict[str, str]


def is_valid_milvus_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name))


# faiss, under Milvus Lite, reading a segment's index file that is shorter than its header says.
_DAMAGED_INDEX = re.compile(r"read error in (/\S+/indexes/[^/\s]+\.idx):")


def damaged_lite_index(message: str) -> Path | None:
    """The Milvus Lite index file a load failed to read, if the error names one that exists here."""
    match = _DAMAGED_INDEX.search(message)
    if not match:
        return None
    path = Path(match.group(1))
    return path if path.is_file() else None


def _as_reembed_error(exc: Exception, what: str) -> ReembedError:
    retriable = bool(getattr(exc, "retriable", False))
    text = str(exc)
    if not retriable and any(
        s in text for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection refused", "Fail connecting")
    ):
        retriable = True
    if retriable or exc.__class__.__name__ in ("MilvusUnavailableException", "ConnectError"):
        return StoreUnavailableError(f"Milvus unavailable during {what}: {text}")
    err = ReembedError(f"Milvus error during {what}: {text}")
    err.is_input_error = bool(getattr(exc, "is_input_error", False))
    return err


class MilvusStore:
    """A connection to one Milvus (server or Lite) with the operations the project needs."""

    def __init__(self, uri: str, token: str | None = None, timeout: float = 30.0, retries: int = 10) -> None:
        from pymilvus import MilvusClient

        self.uri = uri
        self.timeout = timeout
        self.retries = retries
        options = {}
        if "127.0.0.1" in uri or "localhost" in uri:
            # Keepalive pings on loopback buy nothing, and the Milvus Lite server answers pymilvus's
            # 10 s pings with GOAWAY "too_many_pings", dropping the connection mid-run.
            options = {"grpc.keepalive_time_ms": 3_600_000, "grpc.keepalive_permit_without_calls": False}
        try:
            self.client = MilvusClient(uri=uri, token=token or "", timeout=timeout, grpc_options=options)
            version = self.client.get_server_version()
        except Exception as exc:
            raise StoreUnavailableError(f"milvus_uri: cannot reach Milvus at {uri!r}: {exc}") from exc
        self.capabilities = ServerCapabilities.from_version(version)
        self._known_partitions: dict[str, set[str]] = {}
        self._loaded: set[str] = set()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection must not mask the real error
            self.client.close()

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call pymilvus, retrying transient errors with exponential back-off; never input errors."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except ReembedError:
                raise
            except Exception as exc:
                err = _as_reembed_error(exc, what)
                if not err.retriable or attempt == self.retries:
                    raise err from exc
                logger.warning(
                    "%s failed (attempt %d/%d), retrying in %.1fs: %s", what, attempt + 1, self.retries, delay, exc
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    # --- collections and identity -------------------------------------------------------------

    def has_collection(self, name: str) -> bool:
        return self._call("has_collection", self.client.has_collection, name)

    def read_identity(self, name: str) -> CollectionIdentity | None:
        """The identity stored with collection (or alias) `name`, or None if it has none."""
        desc = self._call("describe_collection", self.client.describe_collection, name)
        raw = (desc.get("properties") or {}).get(IDENTITY_PROPERTY)
        return CollectionIdentity.from_json(raw) if raw else None

    def describe(self, name: str) -> CollectionInfo:
        """Collection or alias `name`: the collection behind it, its identity and scalar fields."""
        desc = self._call("describe_collection", self.client.describe_collection, name)
        raw = (desc.get("properties") or {}).get(IDENTITY_PROPERTY)
        scalars = {}
        for f in desc.get("fields", []):
            kind = _SCALAR_KINDS.get(getattr(f.get("type"), "name", str(f.get("type"))))
            if kind:
                scalars[f["name"]] = kind
        return CollectionInfo(
            name=desc.get("collection_name", name),
            identity=CollectionIdentity.from_json(raw) if raw else None,
            scalar_fields=scalars,
        )

    def varchar_max_length(self, name: str, field_name: str) -> int | None:
        """The max_length (UTF-8 bytes) of VARCHAR field `field_name` of collection `name`, if it has one."""
        desc = self._call("describe_collection", self.client.describe_collection, name)
        for f in desc.get("fields", []):
            if f.get("name") == field_name:
                value = (f.get("params") or {}).get("max_length")
                return int(value) if value is not None else None
        return None

    def check_identity(self, name: str, wanted: CollectionIdentity) -> CollectionIdentity:
        """Refuse to touch collection `name` if it was built with another identity."""
        stored = self.read_identity(name)
        if stored is None:
            raise ModelMismatchError(
                f"collection {name!r} exists but was not made by reembed (no {IDENTITY_PROPERTY!r} property); "
                "choose another --collection"
            )
        diffs = stored.differences(wanted)
        if diffs:
            raise ModelMismatchError(
                f"collection {name!r} was built with another model identity: "
                + "; ".join(diffs)
                + ". Use another --collection (or jobs.migrate for a new model)."
            )
        return stored

    def create_collection(
        self, name: str, identity: CollectionIdentity, max_text_bytes: int, build_index: bool = True
    ) -> None:
        """Create `name` with `identity`'s vector field (and re-rank field); `build_index=False` leaves the
        index to `create_vector_index`, so that its build can be timed on its own."""
        from pymilvus import DataType, MilvusClient

        if identity.vector_type == "INT8_VECTOR" and not self.capabilities.int8_vector:
            raise CapabilityError(f"Milvus {self.capabilities.version} has no INT8_VECTOR")
        if identity.vector_type == "BINARY_VECTOR":
            self.capabilities.vector_type_for("binary")  # raises where there is no BINARY_VECTOR
        dimension = int(identity.model["dimension"])
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field(F_VECTOR, getattr(DataType, identity.vector_type), dim=dimension)  # bits for binary
        schema.add_field(F_TEXT, DataType.VARCHAR, max_length=max_text_bytes)
        schema.add_field(F_HASH, DataType.VARCHAR, max_length=64)
        schema.add_field(F_PARTITION, DataType.VARCHAR, max_length=PARTITION_MAX_CHARS)
        if identity.rerank:
            schema.add_field(F_RERANK, DataType.VARCHAR, max_length=rerank_text_bytes(dimension))
        self._call(
            "create_collection",
            self.client.create_collection,
            name,
            schema=schema,
            index_params=self._index_params(identity) if build_index else None,
            properties={IDENTITY_PROPERTY: identity.to_json()},
        )
        logger.info("created collection %r (%s, dim %s)", name, identity.vector_type, dimension)

    def _index_params(self, identity: CollectionIdentity) -> Any:
        index = self.client.prepare_index_params()
        if identity.vector_type == "BINARY_VECTOR":
            index.add_index(F_VECTOR, index_type=BINARY_INDEX, metric_type=metric_for(identity.vector_type))
        else:
            # Nested under "params" (sent as one JSON value): Milvus servers read both forms, but Milvus
            # Lite reads only this one and silently builds its default M=16, efConstruction=200 otherwise.
            build = {"M": identity.hnsw["M"], "efConstruction": identity.hnsw["efConstruction"]}
            index.add_index(
                F_VECTOR, index_type="HNSW", metric_type=metric_for(identity.vector_type), params={"params": build}
            )
        return index

    def create_vector_index(self, name: str, identity: CollectionIdentity) -> None:
        """Build the vector index of a collection made with `build_index=False`."""
        self._call("create_index", self.client.create_index, name, self._index_params(identity))

    def vector_index(self, name: str) -> dict[str, Any]:
        """The vector field's index as Milvus describes it: index_type, metric_type, params, state, rows."""
        for index_name in self._call("list_indexes", self.client.list_indexes, name):
            desc = self._call("describe_index", self.client.describe_index, name, index_name)
            if desc.get("field_name", F_VECTOR) == F_VECTOR:
                return desc
        return {}

    def wait_for_index(self, name: str, timeout: float = 600.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Block until every flushed row of `name` is indexed; returns the index description.

        A Milvus server builds indexes on sealed segments in the background and searches
        unindexed ones another way, so measurements wait for this first.
        """
        deadline = time.monotonic() + timeout
        while True:
            desc = self.vector_index(name)
            state = str(desc.get("state", "Finished"))
            pending = int(desc.get("pending_index_rows", 0) or 0)
            if state.endswith("Finished") and pending == 0:
                return desc
            if state.endswith("Failed"):
                raise ReembedError(f"index build on {name!r} failed: {desc.get('fail_reason') or desc}")
            if time.monotonic() > deadline:
                raise StoreUnavailableError(f"index on {name!r} not built within {timeout:g}s: {desc}")
            time.sleep(poll_s)

    def release(self, name: str) -> None:
        self._call("release_collection", self.client.release_collection, name)
        self._loaded.discard(name)

    def loaded_memory_bytes(self, name: str) -> int | None:
        """Memory Milvus reports for the loaded segments of `name` (vectors, index, scalar fields), or
        None where the server does not report it (Milvus Lite has no such call; 2.3.5 answers 0)."""
        if self.capabilities.is_lite:
            return None
        try:
            segments = self._call("list_loaded_segments", self.client.list_loaded_segments, name)
        except ReembedError:
            return None
        sizes = [int(getattr(seg, "mem_size", 0) or 0) for seg in segments]
        return sum(sizes) if sizes and all(sizes) else None

    def drop_collection(self, name: str) -> None:
        self._call("drop_collection", self.client.drop_collection, name)
        # A collection made again under this name starts unloaded and with only its default partition.
        self._loaded.discard(name)
        self._known_partitions.pop(name, None)

    def load(self, name: str) -> None:
        """Load a collection for search and query (Milvus serves neither from a released one).

        Milvus Lite writes each segment's index file in place after a flush; a process killed in the
        middle leaves it cut short, and every later load fails on it. Such a file is derived data (the
        segment's vectors are kept apart): it is deleted, Milvus Lite builds it again, and the load
        is retried, once per damaged file.
        """
        if name in self._loaded:
            return
        repaired: set[Path] = set()
        while True:
            try:
                self._call("load_collection", self.client.load_collection, name)
                break
            except ReembedError as err:
                path = damaged_lite_index(str(err))
                if path is None or path in repaired:
                    raise
                logger.warning(
                    "collection %r: Milvus Lite index file %s is damaged (cut short by a process that died while "
                    "writing it); deleting it so that Milvus Lite builds it again from the stored vectors",
                    name,
                    path,
                )
                path.unlink(missing_ok=True)
                repaired.add(path)
        self._loaded.add(name)

    def query(self, collection: str, filter_expr: str, output_fields: list[str], **kwargs: Any) -> list[dict]:
        self.load(collection)
        return self._call(
            "query",
            self.client.query,
            collection,
            filter=filter_expr,
            output_fields=output_fields,
            consistency_level="Strong",
            **kwargs,
        )

    # --- partitions ---------------------------------------------------------------------------

    def list_partitions(self, collection: str) -> list[str]:
        return self._call("list_partitions", self.client.list_partitions, collection)

    def ensure_partitions(self, collection: str, names: Iterable[str]) -> None:
        """Create the partitions that do not exist yet; safe when several writers race."""
        known = self._known_partitions.setdefault(collection, set())
        missing = [n for n in names if n not in known]
        if not missing:
            return
        known.update(self.list_partitions(collection))
        for name in missing:
            if name in known:
                continue
            if not is_valid_milvus_name(name):
                raise ConfigError(f"partition name {name!r} is not a valid Milvus name")
            try:
                self._call("create_partition", self.client.create_partition, collection, name)
            except ReembedError:
                # Another writer may have created it between our list and our create.
                if name not in self.list_partitions(collection):
                    raise
            known.add(name)

    # --- rows ---------------------------------------------------------------------------------

    def upsert(self, collection: str, partition: str, rows: Sequence[dict[str, Any]]) -> int:
        """Upsert rows into one partition in requests under MAX_REQUEST_BYTES. Returns rows written."""
        written = 0
        for chunk in _chunks_by_bytes(rows, MAX_REQUEST_BYTES):
            result = self._call(
                "upsert", self.client.upsert, collection, chunk, partition_name=partition, timeout=self.timeout
            )
            written += int(result.get("upsert_count", len(chunk)))
        return written

    def stored_versions(
        self, collection: str, ids: Sequence[str], partitions: Sequence[str] | None = None
    ) -> dict[str, list[tuple[str, str]]]:
        """id -> [(partition, content hash), ...] of the stored copies of these ids (none: absent).

        A query over the whole collection returns one row per id, however many partitions hold a
        copy (the 2.3.5 server keeps the newest; Milvus Lite too, once the old copy is flushed). Where
        copies may sit in several partitions (field partitioning: a document can move), pass
        `partitions`: each is then queried on its own, which finds every copy.
        """
        out: dict[str, list[tuple[str, str]]] = {}
        scopes: list[list[str] | None] = [[p] for p in partitions] if partitions else [None]
        for start in range(0, len(ids), LOOKUP_IDS_PER_QUERY):
            chunk = list(ids[start : start + LOOKUP_IDS_PER_QUERY])
            for scope in scopes:
                kwargs = {"partition_names": scope} if scope else {}
                for row in self.query(collection, in_list(F_ID, chunk), [F_ID, F_PARTITION, F_HASH], **kwargs):
                    out.setdefault(row[F_ID], []).append((row[F_PARTITION], row[F_HASH]))
        return out

    def iter_ids(self, collection: str, partition: str | None = None, batch_size: int = 10_000) -> Iterable[list[str]]:
        """Every stored id (of one partition), in batches."""
        # Filter on the stored partition field: Milvus Lite ignores partition_names in queries.
        expr = equals(F_PARTITION, partition) if partition else ""
        for rows in self.iter_rows(collection, [], batch_size, expr):
            yield [r[F_ID] for r in rows]

    def delete_ids(self, collection: str, ids: Sequence[str]) -> int:
        """Delete these ids from every partition."""
        deleted = 0
        for start in range(0, len(ids), LOOKUP_IDS_PER_QUERY):
            chunk = list(ids[start : start + LOOKUP_IDS_PER_QUERY])
            deleted += self._delete(collection, chunk)
        return deleted

    def delete_before_rewrite(self, collection: str, ids: Sequence[str]) -> int:
        """Delete every copy of these ids, in every partition, before they are written anew (a move).

        On Milvus Lite a delete is a tombstone on the key that a later insert of the same key
        supersedes: a flushed copy in another partition then comes back (seen with Milvus Lite 3.2:
        upsert a into pa, flush, upsert a into pb, delete a, upsert a into pb -> pa holds a again).
        A flush after the delete applies it to the flushed segments first; the server needs none.
        """
        deleted = self.delete_ids(collection, ids)
        if deleted and self.capabilities.is_lite:
            self.flush(collection)
        return deleted

    def _delete(self, collection: str, ids: Sequence[str], partition: str | None = None) -> int:
        """Delete rows by id with an expression built by reembed.expr: never pymilvus' `delete(ids=...)`,
        which quotes VARCHAR keys without escaping them (an id `x"] or id != ["` would delete others)."""
        if not ids:
            return 0
        kwargs = {"partition_name": partition} if partition else {}
        self._call("delete", self.client.delete, collection, filter=in_list(F_ID, ids), **kwargs)
        return len(ids)

    def iter_rows(
        self,
        collection: str,
        fields: list[str],
        batch_size: int = 1000,
        filter_expr: str = "",
        partition_names: list[str] | None = None,
    ) -> Iterable[list[dict[str, Any]]]:
        """Every row of `collection` that `filter_expr` selects (these fields and the id), in batches of
        of about `batch_size`, in primary-key order.

        Paged here by a primary-key cursor (`id > <last id>`) built with reembed.expr, as pymilvus'
        query_iterator pages but without its unescaped `id > "<last id>"`: an id ending in a backslash
        or holding a quote made that iterator repeat a page forever or skip rows. The query asks Milvus
        for an iterator's page (`iterator`, `reduce_stop_for_best`): the smallest keys past the cursor,
        so the largest key of a page is the next cursor.
        """
        self.load(collection)
        # A Strong read first: on the 2.3.5 server an iterator's page does not wait for the writes
        # before it (rows upserted or deleted just now were missing or still there), a plain query does.
        # Unfiltered: Milvus Lite counts a filter by reading every row (35 MB for 2,400 384-d rows).
        self.query(collection, "", ["count(*)"])
        kwargs: dict[str, Any] = {"iterator": "True", "reduce_stop_for_best": "True", "batch_size": batch_size}
        if partition_names:
            kwargs["partition_names"] = partition_names
        last: str | None = None
        while True:
            cursor = f"{F_ID} > {string_literal(last)}" if last is not None else ""
            expr = all_of(cursor, filter_expr) or ALL_ROWS
            rows = self.query(collection, expr, [F_ID, *fields], limit=batch_size, **kwargs)
            if not rows:
                return
            yield rows
            # A page may hold more or fewer rows than asked for (reduce_stop_for_best stops where its
            # segments allow) while more follow: only an empty page ends the scan.
            last = max(r[F_ID] for r in rows)

    # --- aliases ------------------------------------------------------------------------------

    def alias_target(self, alias: str) -> str | None:
        """The collection alias `alias` points at; None if there is no such alias.

        Raises ConfigError where `alias` is the name of a collection itself: one name cannot be both.
        """
        if not self.has_collection(alias):
            return None
        target = str(self._call("describe_collection", self.client.describe_collection, alias)["collection_name"])
        if target == alias:
            raise ConfigError(
                f"alias: {alias!r} is a collection, not an alias; a versioned deployment needs a name no collection "
                "has (serve the new alias instead, or rename)"
            )
        return target

    def aliases_of(self, collection: str) -> list[str]:
        """The aliases that point at `collection`."""
        found = self._call("list_aliases", self.client.list_aliases, collection)
        return list(found.get("aliases", []) if isinstance(found, dict) else found)

    def point_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` in one server-side step: alter_alias where the alias exists,
        create_alias otherwise. A reader sees the old target or the new one, never neither."""
        if self.has_collection(alias):
            self._call("alter_alias", self.client.alter_alias, collection, alias)
        else:
            self._call("create_alias", self.client.create_alias, collection, alias)
        logger.info("alias %r -> %r", alias, collection)

    def collection_id(self, name: str) -> str:
        """Milvus's own id of the collection behind `name`: it changes when a collection is re-created."""
        desc = self._call("describe_collection", self.client.describe_collection, name)
        return str(desc.get("collection_id", ""))

    def flush(self, collection: str) -> None:
        self._call("flush", self.client.flush, collection)

    def fetch(self, collection: str, ids: Sequence[str], fields: list[str], chunk: int = 1000) -> list[dict]:
        """Rows with these ids (in no particular order; missing ids are left out)."""
        rows: list[dict] = []
        for start in range(0, len(ids), chunk):
            part = list(ids[start : start + chunk])
            rows += self.query(collection, in_list(F_ID, part), [F_ID, *fields], limit=len(part))
        return rows

    def count(self, collection: str, partition: str | None = None) -> int:
        # Filter on the stored partition field: Milvus Lite ignores partition_names in count(*).
        expr = equals(F_PARTITION, partition) if partition else ""
        res = self.query(collection, expr, ["count(*)"])
        return int(res[0]["count(*)"])


def metric_for(vector_type: str) -> str:
    """How a vector field is searched: Hamming distance for sign bits, inner product otherwise."""
    return "HAMMING" if vector_type == "BINARY_VECTOR" else "IP"


def vector_payload(vectors: np.ndarray, vector_type: str) -> list[np.ndarray] | list[bytes]:
    """Per-row vectors as the field wants them: int8 for INT8_VECTOR, the packed bits (uint8 (n, d/8)
    from `quantize.binarize`) as bytes for BINARY_VECTOR, float32 otherwise."""
    if vector_type == "BINARY_VECTOR":
        if vectors.dtype != np.uint8:
            raise ValueError(f"vector_payload: BINARY_VECTOR wants packed uint8 bits, got {vectors.dtype}")
        return [row.tobytes() for row in np.ascontiguousarray(vectors)]
    dtype = np.int8 if vector_type == "INT8_VECTOR" else np.float32
    return list(np.ascontiguousarray(vectors, dtype=dtype))


def _row_bytes(row: dict[str, Any]) -> int:
    size = 64
    for value in row.values():
        if isinstance(value, np.ndarray):
            size += value.nbytes
        elif isinstance(value, bytes):
            size += len(value)
        elif isinstance(value, str):
            size += len(value) * 4 if not value.isascii() else len(value)
    return size


def _chunks_by_bytes(rows: Sequence[dict[str, Any]], budget: int) -> Iterable[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        b = _row_bytes(row)
        if chunk and size + b > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += b
    if chunk:
        yield chunk
