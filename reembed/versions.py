"""Versioned collections behind an alias: the records of a blue-green migration, kept in Milvus.

Sits beside both flows. `jobs/migrate.py` builds `{alias}_v{N}` with the backfill job and moves the
alias; the service only ever sees the alias (and reads the model from the collection behind it).
What the migration knows about each version (model, dimension, precision, rows, the rows it must
hold, build time, gate report, state) and which versions served in which order lives in a small
registry collection in the same Milvus, not in a local file, so `--status` and `--rollback` work
from any machine.

A version's state: `building` (the job runs or crashed: a rerun resumes it), `ready` (built and
passed its gate), `failed` (the build or the gate failed: never gets the alias), `serving` (the
alias points at it), `retired` (served once; a rollback or a switch may point back at it),
`dropped` (its collection is gone, the record stays).

Milvus's alias is the truth about what serves; the registry follows it. The alias is moved first
(one atomic `alter_alias`), then the records: a crash between the two leaves the registry one step
behind, which `status` shows and the next switch or rollback repairs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from reembed.errors import ConfigError, ReembedError
from reembed.expr import equals
from reembed.store import MilvusStore

logger = logging.getLogger(__name__)

REGISTRY_COLLECTION = "reembed_versions"
R_KEY = "key"
R_ALIAS = "alias"
R_RECORD = "record"
R_VECTOR = "placeholder"  # Milvus 2.3 wants a vector field in every collection
RECORD_MAX_BYTES = 65_535
HISTORY_KEPT = 50

BUILDING, READY, FAILED, SERVING, RETIRED, DROPPED = "building", "ready", "failed", "serving", "retired", "dropped"
STATES = (BUILDING, READY, FAILED, SERVING, RETIRED, DROPPED)
# States from which the alias may be pointed at a version (it was built and its gate passed).
SWITCHABLE = (READY, RETIRED)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def version_collection(alias: str, version: int) -> str:
    return f"{alias}_v{version}"


def parse_version(alias: str, collection: str) -> int | None:
    """N of `{alias}_v{N}`, or None for a collection that does not follow the scheme."""
    match = re.fullmatch(re.escape(alias) + r"_v(\d+)", collection)
    return int(match.group(1)) if match else None


@dataclass
class VersionRecord:
    """One concrete collection behind an alias and what is known about it."""

    alias: str
    version: int
    collection: str
    state: str
    model: str  # what --to-model named (hub name or path)
    precision: str
    model_identity: dict[str, Any] = field(default_factory=dict)  # the collection's, once built
    rerank: bool = False  # keeps float16 re-rank copies: searched in two stages
    rows: int | None = None
    # The rows it must hold: the input's good unique documents, as the latest build run counted them.
    # Kept because a rerun skips the shards an earlier run read; None: unknown (the gate then fails),
    # as in records written before this field existed.
    input_documents: int | None = None
    build_seconds: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    switched_at: str | None = None
    retired_at: str | None = None
    gate: dict[str, Any] | None = None
    error: str | None = None
    backfill: dict[str, Any] | None = None  # the job's summary, trimmed
    adopted: bool = False  # found behind the alias, not built by jobs.migrate

    def key(self) -> str:
        return f"{self.alias}#v{self.version}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str) -> VersionRecord:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> dict[str, Any]:
        """What `--status` shows of a version."""
        ident = self.model_identity or {}
        gate = self.gate or {}
        return {
            "version": self.version,
            "collection": self.collection,
            "state": self.state,
            "model": ident.get("name", self.model),
            "model_revision": ident.get("revision"),
            "weights_sha256": ident.get("weights_sha256"),
            "dimension": ident.get("dimension"),
            "precision": self.precision,
            "rerank": self.rerank,
            "rows": self.rows,
            "input_documents": self.input_documents,
            "build_seconds": self.build_seconds,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "switched_at": self.switched_at,
            "gate": {"passed": gate.get("passed"), "failed_checks": gate.get("failed_checks", [])} if gate else None,
            "error": self.error,
            "adopted": self.adopted,
        }


@dataclass
class AliasRecord:
    """Which versions served, oldest first; the last is the alias's target."""

    alias: str
    history: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def key(self) -> str:
        return f"{self.alias}#alias"

    @property
    def target(self) -> int | None:
        return self.history[-1] if self.history else None

    @property
    def rollback_target(self) -> int | None:
        return self.history[-2] if len(self.history) > 1 else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AliasRecord:
        return cls(**json.loads(text))


class VersionRegistry:
    """The records of every alias's versions, in the registry collection of one Milvus."""

    def __init__(self, store: MilvusStore, collection: str = REGISTRY_COLLECTION) -> None:
        self.store = store
        self.collection = collection

    # --- the registry collection ----------------------------------------------------------------

    def ensure(self) -> None:
        """Create the registry collection where it does not exist yet."""
        from pymilvus import DataType, MilvusClient

        if self.store.has_collection(self.collection):
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(R_KEY, DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field(R_ALIAS, DataType.VARCHAR, max_length=255)
        schema.add_field(R_RECORD, DataType.VARCHAR, max_length=RECORD_MAX_BYTES)
        schema.add_field(R_VECTOR, DataType.FLOAT_VECTOR, dim=2)
        index = self.store.client.prepare_index_params()
        index.add_index(R_VECTOR, index_type="FLAT", metric_type="L2")
        try:
            create = self.store.client.create_collection
            self.store._call("create_collection", create, self.collection, schema=schema, index_params=index)
        except ReembedError:
            if not self.store.has_collection(self.collection):  # another migrate may have made it meanwhile
                raise
        logger.info("created the version registry %r", self.collection)

    def _put(self, key: str, alias: str, text: str) -> None:
        if len(text.encode()) > RECORD_MAX_BYTES:
            raise ReembedError(f"registry record {key!r} is {len(text.encode())} bytes, over {RECORD_MAX_BYTES}")
        row = {R_KEY: key, R_ALIAS: alias, R_RECORD: text, R_VECTOR: [0.0, 0.0]}
        # No flush: the write is durable once acknowledged (Milvus's log; Milvus Lite's file), and
        # Strong reads see it. A flush per record costs seconds on a server.
        self.store._call("upsert", self.store.client.upsert, self.collection, [row])

    def _rows(self, alias: str) -> list[dict[str, Any]]:
        if not self.store.has_collection(self.collection):
            return []
        return self.store.query(self.collection, equals(R_ALIAS, alias), [R_KEY, R_RECORD])

    # --- records --------------------------------------------------------------------------------

    def put_version(self, record: VersionRecord) -> None:
        self._put(record.key(), record.alias, record.to_json())

    def put_alias(self, record: AliasRecord) -> None:
        record.events = record.events[-HISTORY_KEPT:]
        record.history = record.history[-HISTORY_KEPT:]
        self._put(record.key(), record.alias, record.to_json())

    def versions(self, alias: str) -> dict[int, VersionRecord]:
        out = {}
        for row in self._rows(alias):
            if row[R_KEY].endswith("#alias"):
                continue
            record = VersionRecord.from_json(row[R_RECORD])
            out[record.version] = record
        return dict(sorted(out.items()))

    def alias_record(self, alias: str) -> AliasRecord:
        for row in self._rows(alias):
            if row[R_KEY] == f"{alias}#alias":
                return AliasRecord.from_json(row[R_RECORD])
        return AliasRecord(alias=alias)

    def next_version(self, alias: str) -> int:
        """One more than any version recorded or any `{alias}_v{N}` collection in Milvus."""
        known = set(self.versions(alias))
        for name in self.store._call("list_collections", self.store.client.list_collections):
            number = parse_version(alias, name)
            if number is not None:
                known.add(number)
        return max(known, default=0) + 1

    # --- what serves ----------------------------------------------------------------------------

    def sync(self, alias: str) -> tuple[AliasRecord, dict[int, VersionRecord]]:
        """The alias record and the versions, reconciled with where Milvus's alias really points.

        An alias made by hand (or by a registry write lost in a crash) is adopted: its target gets a
        record (`adopted`), so that a migration away from it can be rolled back to it.
        """
        record = self.alias_record(alias)
        versions = self.versions(alias)
        target = self.store.alias_target(alias)
        if target is None:
            return record, versions
        by_collection = {v.collection: v for v in versions.values()}
        current = by_collection.get(target)
        if current is None:
            number = parse_version(alias, target)
            number = number if number is not None and number not in versions else self.next_version(alias)
            identity = self.store.read_identity(target)
            if identity is None:
                raise ConfigError(
                    f"alias: {alias!r} points at {target!r}, which has no reembed identity; only collections made "
                    "by the backfill job can be migrated"
                )
            current = VersionRecord(
                alias=alias,
                version=number,
                collection=target,
                state=SERVING,
                model=identity.model.get("name", "?"),
                precision=identity.precision,
                rerank=bool(identity.rerank),
                model_identity=identity.model,
                rows=self.store.count(target),
                switched_at=now_iso(),
                adopted=True,
            )
            self.put_version(current)
            versions[number] = current
            logger.info("adopted %r (behind alias %r) as version %d", target, alias, number)
        if record.target != current.version:
            record.history = [v for v in record.history if v != current.version] + [current.version]
            record.events.append({"event": "adopt", "version": current.version, "at": now_iso()})
            self.put_alias(record)
        if current.state != SERVING:
            current.state = SERVING
            self.put_version(current)
        return record, versions

    def switch(self, alias: str, version: int, event: str = "switch") -> AliasRecord:
        """Point the alias at `version` (which must be built, gated and present), then record it."""
        record, versions = self.sync(alias)
        new = versions.get(version)
        if new is None:
            raise ConfigError(f"switch: alias {alias!r} has no version {version}; known: {sorted(versions)}")
        if record.target == version:
            return record
        if new.state not in SWITCHABLE or not (new.gate or {}).get("passed", new.adopted):
            raise ConfigError(
                f"switch: version {version} of {alias!r} is {new.state!r}"
                + (" and did not pass its gate" if new.gate and not new.gate.get("passed") else "")
                + "; only a built version whose gate passed can get the alias"
            )
        if not self.store.has_collection(new.collection):
            raise ConfigError(f"switch: the collection {new.collection!r} of version {version} no longer exists")
        self.store.load(new.collection)  # searchable before the first request reaches it
        previous = versions.get(record.target) if record.target is not None else None
        self.store.point_alias(alias, new.collection)
        stamp = now_iso()
        if previous is not None:
            previous.state, previous.retired_at = RETIRED, stamp
            self.put_version(previous)
        new.state, new.switched_at = SERVING, stamp
        self.put_version(new)
        record.history = [v for v in record.history if v != version] + [version]
        record.events.append({"event": event, "from": record.rollback_target, "to": version, "at": stamp})
        self.put_alias(record)
        return record

    def rollback(self, alias: str) -> AliasRecord:
        """Point the alias back at the version that served before the current one."""
        record, versions = self.sync(alias)
        if record.target is None:
            raise ConfigError(f"rollback: {alias!r} is not an alias (nothing serves through it)")
        back = record.rollback_target
        while back is not None and (
            back not in versions
            or versions[back].state == DROPPED
            or not self.store.has_collection(versions[back].collection)
        ):
            record.history.remove(back)  # dropped since: roll further back
            back = record.rollback_target
        if back is None:
            raise ConfigError(f"rollback: {alias!r} has no earlier version to go back to (history {record.history})")
        current, previous = versions[record.target], versions[back]
        self.store.load(previous.collection)
        self.store.point_alias(alias, previous.collection)
        stamp = now_iso()
        current.state, current.retired_at = RETIRED, stamp
        self.put_version(current)
        previous.state, previous.switched_at = SERVING, stamp
        self.put_version(previous)
        record.history.pop()
        record.events.append({"event": "rollback", "from": current.version, "to": back, "at": stamp})
        self.put_alias(record)
        return record

    def protected(self, record: AliasRecord, versions: dict[int, VersionRecord]) -> dict[int, str]:
        """Versions that must not be dropped, with why: the target, the rollback target, running builds."""
        out = {}
        if record.target is not None:
            out[record.target] = "the alias points at it"
        if record.rollback_target is not None:
            out.setdefault(record.rollback_target, "it is the rollback target")
        for number, v in versions.items():
            if v.state == BUILDING:
                out.setdefault(number, "it is building")
        return out

    def drop(self, alias: str, version: int) -> VersionRecord:
        """Drop a version's collection (keeping its record); refuses the alias and rollback targets."""
        record, versions = self.sync(alias)
        found = versions.get(version)
        if found is None:
            raise ConfigError(f"drop: alias {alias!r} has no version {version}; known: {sorted(versions)}")
        why = self.protected(record, versions).get(version)
        if why:
            raise ConfigError(f"drop: refusing to drop version {version} ({found.collection!r}): {why}")
        if self.store.has_collection(found.collection):
            aliases = self.store.aliases_of(found.collection)
            if aliases:  # Milvus Lite would drop a collection behind an alias
                raise ConfigError(f"drop: refusing to drop {found.collection!r}: aliases {aliases} point at it")
            self.store.drop_collection(found.collection)
        found.state = DROPPED
        self.put_version(found)
        record.events.append({"event": "drop", "version": version, "at": now_iso()})
        self.put_alias(record)
        return found

    def retain(self, alias: str, keep: int) -> list[int]:
        """Drop all but the `keep` newest versions that still exist, never a protected one."""
        record, versions = self.sync(alias)
        protected = self.protected(record, versions)
        alive = [n for n, v in sorted(versions.items(), reverse=True) if v.state != DROPPED]
        dropped = []
        for number in alive[keep:]:
            if number not in protected:
                self.drop(alias, number)
                dropped.append(number)
        return dropped

    def status(self, alias: str) -> dict[str, Any]:
        """The alias's target and every version, as `python -m jobs.migrate --status` prints it."""
        record, versions = self.sync(alias)
        target = self.store.alias_target(alias)
        return {
            "alias": alias,
            "target": target,
            "target_version": record.target,
            "rollback_version": record.rollback_target,
            "history": record.history,
            "versions": [v.summary() for v in versions.values()],
            "events": record.events[-10:],
        }
