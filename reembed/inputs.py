"""Find the input files (local or any pyarrow filesystem) and check them before any work starts.

`inspect_input` lists JSONL and Parquet files under a path or URI and peeks at their first
records, so a missing input, an unreadable file or a field name that no record has fails with a
clear message before Ray starts a single task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reembed.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
PEEK_RECORDS = 200


@dataclass
class InputPlan:
    filesystem: pafs.FileSystem
    jsonl_files: list[str] = field(default_factory=list)
    parquet_files: list[str] = field(default_factory=list)
    fields_seen: set[str] = field(default_factory=set)
    total_bytes: int = 0

    @property
    def files(self) -> list[str]:
        return self.jsonl_files + self.parquet_files


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:
            raise ConfigError(f"input: cannot open filesystem for {uri!r}: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def list_input_files(uri: str) -> InputPlan:
    fs, path = resolve_filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except Exception as exc:
        raise ConfigError(f"input: cannot stat {uri!r}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input: {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        candidates = [info]
    else:
        candidates = [
            i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File
        ]
    plan = InputPlan(filesystem=fs)
    for item in sorted(candidates, key=lambda i: i.path):
        name = item.path.lower()
        plan.total_bytes += item.size or 0
        if name.endswith(JSONL_SUFFIXES):
            plan.jsonl_files.append(item.path)
        elif name.endswith(PARQUET_SUFFIXES):
            plan.parquet_files.append(item.path)
        elif info.type == pafs.FileType.File:
            raise ConfigError(f"input: {uri!r} is neither JSONL ({', '.join(JSONL_SUFFIXES)}) nor Parquet")
    if not plan.files:
        raise ConfigError(f"input: no JSONL or Parquet files under {uri!r}")
    return plan


def _peek_jsonl(fs: pafs.FileSystem, path: str, limit: int) -> set[str]:
    seen: set[str] = set()
    try:
        with fs.open_input_stream(path) as stream:
            buffered = stream.read(1 << 20).decode("utf-8", errors="replace")
    except Exception as exc:
        raise ConfigError(f"input: cannot read {path!r}: {exc}") from exc
    # Records end at "\n" only (as the reader cuts them): str.splitlines would also cut at U+2028,
    # U+2029 and U+0085, which json.dumps(ensure_ascii=False) leaves raw inside strings.
    for line in buffered.split("\n")[:limit]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a bad line is a reject later, not a config error
        if isinstance(record, dict):
            seen.update(record)
    return seen


def inspect_input(uri: str, id_field: str, text_fields: list[str], partition_by: str | None) -> InputPlan:
    """List the files and check that the named fields exist in them."""
    plan = list_input_files(uri)
    for path in plan.jsonl_files[:3]:
        plan.fields_seen |= _peek_jsonl(plan.filesystem, path, PEEK_RECORDS)
    for path in plan.parquet_files:
        try:
            with plan.filesystem.open_input_file(path) as fh:
                plan.fields_seen |= set(pq.read_schema(fh).names)
        except Exception as exc:
            raise ConfigError(f"input: cannot read Parquet file {path!r}: {exc}") from exc
    if not plan.fields_seen:
        raise ConfigError(f"input: no JSON object found in the first records of {plan.files[0]!r}")
    seen = ", ".join(sorted(plan.fields_seen))
    if id_field not in plan.fields_seen:
        raise ConfigError(f"id_field: {id_field!r} is in none of the first records; fields seen: {seen}")
    if not set(text_fields) & plan.fields_seen:
        raise ConfigError(f"text_fields: none of {text_fields} is in the first records; fields seen: {seen}")
    if partition_by and partition_by not in plan.fields_seen:
        raise ConfigError(f"partition_by: {partition_by!r} is in none of the first records; fields seen: {seen}")
    return plan
