"""Back up a collection to Parquet files and restore it into a new collection.

Sits beside the job's flow, after it: `python -m jobs.backup snapshot` streams every partition of a
collection out of Milvus with `MilvusStore.iter_rows` (one batch of rows in memory at a time) into Parquet
files, and writes a manifest (`backup.json`) that holds what the rows alone do not: the schema, the
vector index, the collection's properties (the `reembed.identity` that binds the model and the int8
calibration), the partitions, and per file its row count and SHA-256. `restore` checks the files
against the manifest before it creates anything, then rebuilds the collection under a new name and
streams the rows back partition by partition with idempotent upserts, so a retried restore never
makes a duplicate row.

Layout of a backup directory::

    backup.json                          written last: a directory without it is an unfinished backup
    partitions/<partition>/part-00000.parquet
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed.errors import CapabilityError, ConfigError, ReembedError
from reembed.store import F_ID, IDENTITY_PROPERTY, MilvusStore, is_valid_milvus_name

logger = logging.getLogger(__name__)

BACKUP_FORMAT = 1
MANIFEST_NAME = "backup.json"
PARTITIONS_DIR = "partitions"
DEFAULT_ROWS_PER_FILE = 100_000
DEFAULT_BATCH_ROWS = 1_000
# describe_index answers these besides the build parameters; they are state, not settings.
_INDEX_STATE_KEYS = {
    "index_type",
    "metric_type",
    "field_name",
    "index_name",
    "total_rows",
    "indexed_rows",
    "pending_index_rows",
    "state",
    "params",
}
_SCALAR_ARROW = {
    "VARCHAR": pa.string(),
    "BOOL": pa.bool_(),
    "INT8": pa.int8(),
    "INT16": pa.int16(),
    "INT32": pa.int32(),
    "INT64": pa.int64(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "JSON": pa.string(),  # stored as JSON text
}
_INT_PARAMS = ("dim", "max_length", "max_capacity")
_VECTOR_DTYPES = {"FLOAT_VECTOR": np.float32, "INT8_VECTOR": np.int8}


@dataclass(frozen=True)
class FieldSpec:
    """One field of the schema, as the manifest keeps it."""

    name: str
    type: str
    params: dict[str, Any]
    is_primary: bool = False

    def arrow_type(self) -> pa.DataType:
        if self.type in _VECTOR_DTYPES:
            return pa.list_(pa.from_numpy_dtype(_VECTOR_DTYPES[self.type]), int(self.params["dim"]))
        if self.type == "BINARY_VECTOR":
            return pa.binary(int(self.params["dim"]) // 8)
        if self.type in _SCALAR_ARROW:
            return _SCALAR_ARROW[self.type]
        raise CapabilityError(
            f"field {self.name!r}: type {self.type} cannot be backed up; supported: "
            f"{', '.join([*_SCALAR_ARROW, *_VECTOR_DTYPES, 'BINARY_VECTOR'])}"
        )


def _type_name(value: Any) -> str:
    return getattr(value, "name", str(value))


def _fields_of(desc: dict[str, Any]) -> list[FieldSpec]:
    fields = []
    for f in desc.get("fields", []):
        params = {
            k: (int(v) if k in ("dim", "max_length", "max_capacity") else v) for k, v in f.get("params", {}).items()
        }
        spec = FieldSpec(f["name"], _type_name(f["type"]), params, bool(f.get("is_primary")))
        spec.arrow_type()  # refuse unsupported types before any file is written
        fields.append(spec)
    return fields


def _index_specs(store: MilvusStore, collection: str) -> list[dict[str, Any]]:
    out = []
    for name in store._call("list_indexes", store.client.list_indexes, collection):
        desc = store._call("describe_index", store.client.describe_index, collection, name)
        params = dict(desc.get("params") or {})
        params.update({k: v for k, v in desc.items() if k not in _INDEX_STATE_KEYS})
        out.append(
            {
                "field_name": desc.get("field_name", name),
                "index_name": desc.get("index_name", name),
                "index_type": desc.get("index_type"),
                "metric_type": desc.get("metric_type"),
                "params": params,
            }
        )
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _vector_array(value: Any, dtype: type) -> np.ndarray:
    """One row's vector as pymilvus returns it (a list of numbers, bytes, or [bytes]) as a flat array."""
    if isinstance(value, list) and value and isinstance(value[0], (bytes, bytearray)):
        value = value[0]
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(value, dtype=dtype)
    return np.asarray(value, dtype=dtype)


def _to_arrow(rows: list[dict[str, Any]], fields: list[FieldSpec], schema: pa.Schema) -> pa.Table:
    columns = []
    for f in fields:
        values = [r[f.name] for r in rows]
        if f.type in _VECTOR_DTYPES:
            dtype = _VECTOR_DTYPES[f.type]
            flat = np.concatenate([_vector_array(v, dtype) for v in values])
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), int(f.params["dim"])))
        elif f.type == "BINARY_VECTOR":
            columns.append(pa.array([bytes(v[0] if isinstance(v, list) else v) for v in values], f.arrow_type()))
        elif f.type == "JSON":
            columns.append(pa.array([json.dumps(v) for v in values], pa.string()))
        else:
            columns.append(pa.array(values, f.arrow_type()))
    return pa.Table.from_arrays(columns, schema=schema)


def _from_arrow(batch: pa.RecordBatch, fields: list[FieldSpec]) -> list[dict[str, Any]]:
    columns: dict[str, list[Any]] = {}
    for f in fields:
        col = batch.column(f.name)
        if f.type in _VECTOR_DTYPES:
            # flatten(), not .values: it honours the offset of a sliced batch.
            flat = col.flatten().to_numpy(zero_copy_only=False).astype(_VECTOR_DTYPES[f.type], copy=False)
            columns[f.name] = list(flat.reshape(len(col), int(f.params["dim"])))
        elif f.type == "BINARY_VECTOR":
            columns[f.name] = col.to_pylist()
        elif f.type == "JSON":
            columns[f.name] = [json.loads(v) for v in col.to_pylist()]
        else:
            columns[f.name] = col.to_pylist()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def iter_partition_rows(
    store: MilvusStore, collection: str, partition: str, output_fields: list[str], batch_rows: int
) -> Iterator[list[dict[str, Any]]]:
    """The rows of one partition, `batch_rows` at a time (MilvusStore.iter_rows: paged by an escaped
    primary-key cursor, so any id is read exactly once)."""
    fields = [f for f in output_fields if f != F_ID]
    for batch in store.iter_rows(collection, fields, batch_rows, partition_names=[partition]):
        yield [{f: row[f] for f in output_fields} for row in batch]


class _RollingParquet:
    """Parquet files of at most `rows_per_file` rows each, written batch by batch."""

    def __init__(self, folder: Path, schema: pa.Schema, rows_per_file: int) -> None:
        self.folder, self.schema, self.rows_per_file = folder, schema, rows_per_file
        self.files: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                path = self.folder / f"part-{len(self.files):05d}.parquet"
                self.folder.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
                self.files.append({"path": path, "rows": 0})
            room = self.rows_per_file - self._rows
            head, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(head)
            self._rows += head.num_rows
            self.files[-1]["rows"] += head.num_rows
            if self._rows >= self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._rows = None, 0


def snapshot(
    store: MilvusStore,
    collection: str,
    out_dir: str | Path,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Any]:
    """Write collection (or the collection behind an alias) `collection` to `out_dir`. Returns the manifest.

    Writes should be paused meanwhile: Milvus has no snapshot, so rows upserted during the backup may
    or may not be in it. A collection whose row count moved during the backup is refused.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out: expected a new or empty directory, got {str(out)!r} which has files in it")
    if rows_per_file < 1 or batch_rows < 1:
        raise ConfigError(f"rows_per_file and batch_rows: expected >= 1, got {rows_per_file} and {batch_rows}")
    if not store.has_collection(collection):
        raise ConfigError(f"collection: no collection or alias {collection!r} on {store.uri}")
    desc = store._call("describe_collection", store.client.describe_collection, collection)
    name = desc.get("collection_name", collection)
    if desc.get("enable_dynamic_field"):
        raise CapabilityError(f"collection {name!r} has a dynamic field, which backups do not keep")
    if desc.get("auto_id"):
        raise CapabilityError(f"collection {name!r} has auto_id primary keys, which a restore cannot keep")
    fields = _fields_of(desc)
    schema = pa.schema([pa.field(f.name, f.arrow_type(), nullable=False) for f in fields])
    store.load(name)
    expected = store.count(name)
    partitions = store.list_partitions(name)
    out.mkdir(parents=True, exist_ok=True)
    manifest_partitions = []
    total = 0
    for partition in partitions:
        folder = out / PARTITIONS_DIR / partition
        writer = _RollingParquet(folder, schema, rows_per_file)
        rows = 0
        try:
            for batch in iter_partition_rows(store, name, partition, [f.name for f in fields], batch_rows):
                writer.write(_to_arrow(batch, fields, schema))
                rows += len(batch)
        finally:
            writer.close()
        files = [
            {"path": str(f["path"].relative_to(out)), "rows": f["rows"], "sha256": _sha256(f["path"])}
            for f in writer.files
        ]
        manifest_partitions.append({"name": partition, "rows": rows, "files": files})
        total += rows
        logger.info("partition %r: %d rows in %d file(s)", partition, rows, len(files))
    if total != expected:
        raise ReembedError(
            f"collection {name!r} had {expected} rows when the backup started and {total} were read: it was "
            "written to during the backup; pause writers and back up again"
        )
    manifest = {
        "format": BACKUP_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "source": {"uri": store.uri, "server_version": store.capabilities.version, "collection": name},
        "description": desc.get("description", ""),
        "consistency_level": desc.get("consistency_level_name") or desc.get("consistency_level"),
        "num_shards": desc.get("num_shards"),
        "fields": [f.__dict__ for f in fields],
        "indexes": _index_specs(store, name),
        "properties": dict(desc.get("properties") or {}),
        "partitions": manifest_partitions,
        "rows": total,
    }
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def read_manifest(backup_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a finished backup; with `verify`, every file's row count and SHA-256 are checked."""
    root = Path(backup_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(
            f"from: {str(root)!r} has no {MANIFEST_NAME}: not a backup, or one that did not finish (the manifest "
            "is written last)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != BACKUP_FORMAT:
        raise ConfigError(f"{path}: format: expected {BACKUP_FORMAT}, got {manifest.get('format')!r}")
    if verify:
        for part in manifest["partitions"]:
            for f in part["files"]:
                file = root / f["path"]
                if not file.is_file():
                    raise ConfigError(f"backup file {str(file)!r} is missing")
                digest = _sha256(file)
                if digest != f["sha256"]:
                    raise ConfigError(f"backup file {str(file)!r}: sha256 expected {f['sha256']}, got {digest}")
                rows = pq.ParquetFile(file).metadata.num_rows
                if rows != f["rows"]:
                    raise ConfigError(f"backup file {str(file)!r}: expected {f['rows']} rows, got {rows}")
    return manifest


def _create_from_manifest(store: MilvusStore, name: str, manifest: dict[str, Any]) -> None:
    from pymilvus import DataType, MilvusClient

    fields = [FieldSpec(**f) for f in manifest["fields"]]
    for f in fields:
        if f.type == "INT8_VECTOR" and not store.capabilities.int8_vector:
            raise CapabilityError(
                f"field {f.name!r} is an INT8_VECTOR, which Milvus {store.capabilities.version} does not have "
                "(needs 2.6+): restore onto a Milvus 2.6+ server"
            )
    schema = MilvusClient.create_schema(
        auto_id=False, enable_dynamic_field=False, description=manifest.get("description", "")
    )
    for f in fields:
        schema.add_field(f.name, getattr(DataType, f.type), is_primary=f.is_primary, **f.params)
    index = store.client.prepare_index_params()
    identity = json.loads((manifest.get("properties") or {}).get(IDENTITY_PROPERTY) or "{}")
    for spec in manifest["indexes"]:
        params = spec.get("params") or {}
        if not params and spec.get("index_type") == "HNSW" and identity.get("hnsw"):
            # Milvus Lite does not report build parameters; the identity keeps the ones the job asked for.
            params = dict(identity["hnsw"])
        index.add_index(
            spec["field_name"],
            index_type=spec.get("index_type") or "",
            index_name=spec.get("index_name") or "",
            metric_type=spec.get("metric_type"),
            params=params,
        )
    options: dict[str, Any] = {}
    if manifest.get("consistency_level") is not None:
        options["consistency_level"] = manifest["consistency_level"]
    if manifest.get("num_shards") and not store.capabilities.is_lite:
        options["num_shards"] = int(manifest["num_shards"])
    store._call(
        "create_collection",
        store.client.create_collection,
        name,
        schema=schema,
        index_params=index if manifest["indexes"] else None,
        properties=manifest.get("properties") or {},
        **options,
    )


def point_alias(store: MilvusStore, alias: str, collection: str) -> None:
    """Create `alias` for `collection`, or move it there if it names another collection."""
    try:
        store._call("describe_alias", store.client.describe_alias, alias)
        exists = True
    except ReembedError:
        exists = False
    fn = store.client.alter_alias if exists else store.client.create_alias
    store._call("alter_alias" if exists else "create_alias", fn, collection, alias)
    logger.info("alias %r -> %r", alias, collection)


def restore(
    store: MilvusStore,
    backup_dir: str | Path,
    collection: str,
    alias: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Any]:
    """Rebuild a backup as the NEW collection `collection`; optionally point `alias` at it. Returns a summary."""
    if not is_valid_milvus_name(collection):
        raise ConfigError(f"collection: expected a valid Milvus name, got {collection!r}")
    if alias is not None and not is_valid_milvus_name(alias):
        raise ConfigError(f"alias: expected a valid Milvus name, got {alias!r}")
    root = Path(backup_dir)
    manifest = read_manifest(root, verify=True)
    if store.has_collection(collection):
        raise ConfigError(
            f"collection: {collection!r} already exists on {store.uri}; a restore makes a new collection: "
            "choose another name (and move an alias to it with --alias)"
        )
    _create_from_manifest(store, collection, manifest)
    fields = [FieldSpec(**f) for f in manifest["fields"]]
    existing = set(store.list_partitions(collection))
    store.ensure_partitions(collection, [p["name"] for p in manifest["partitions"] if p["name"] not in existing])
    loaded: dict[str, int] = {}
    for part in manifest["partitions"]:
        rows = 0
        for f in part["files"]:
            parquet = pq.ParquetFile(root / f["path"])
            for batch in parquet.iter_batches(batch_size=batch_rows):
                rows += store.upsert(collection, part["name"], _from_arrow(batch, fields))
        loaded[part["name"]] = rows
        logger.info("partition %r: %d rows restored", part["name"], rows)
    store.flush(collection)
    count = store.count(collection)
    if count != manifest["rows"]:
        raise ReembedError(
            f"restore into {collection!r}: the backup has {manifest['rows']} rows, the collection has {count}"
        )
    if alias:
        point_alias(store, alias, collection)
    identity = (manifest.get("properties") or {}).get(IDENTITY_PROPERTY)
    return {
        "collection": collection,
        "alias": alias,
        "rows": count,
        "partitions": loaded,
        "source_collection": manifest["source"]["collection"],
        "model": json.loads(identity)["model"].get("name") if identity else None,
    }
