"""Typed settings for the job and the service, with one precedence: flag > file > env > default.

`load_settings(cls, flags, config_file)` is the only way entrypoints build a config: values from
the file (JSON, TOML or YAML) are overridden by flags; both beat `REEMBED_*` environment variables,
which beat the defaults here. Validation happens once, here, before any work starts, with messages
that name the field, the expected and the actual value.

A list setting takes the same spellings from every source: a list (file), or one string holding
comma-separated items or a JSON list (flag, file, environment: `REEMBED_TEXT_FIELDS=title,text`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import tomllib
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from reembed.errors import ConfigError
from reembed.lite import is_lite_uri

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MILVUS_URI = "./data/reembed.db"
DEFAULT_COLLECTION = "documents"
# First-stage candidates per result that two-stage search re-ranks with floats (README: measured).
DEFAULT_RESCORE_MULTIPLIER = 10
# Milvus's own rule for collection and partition names.
MILVUS_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

# What a backfill (or a migration's new version) stores: int8 or float32 vectors, or binary sign
# bits (always with re-rank copies).
JobPrecision = Literal["int8", "float32", "binary"]
Int8Scheme = Literal["global", "per-dim"]
WriteMode = Literal["upsert", "bulk"]
# A number of texts per forward pass, or "auto": probed once per actor and cached (reembed/batching.py).
BatchSize = Annotated[int, Field(ge=1, le=4096)] | Literal["auto"]
# Weights and activations of the model: "auto" is float16 on CUDA, float32 on the CPU.
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
# "onnx" runs the model with int8 weights on the CPU (reembed/backends.py); "openvino" is refused
# with the reason (check_backend).
Backend = Literal["torch", "onnx", "openvino"]
# The Python module each backend needs, and the extra that installs it.
BACKEND_MODULES = {"onnx": ("onnxruntime", "onnx")}


def split_list(value: Any) -> Any:
    """A list setting given as one string: comma-separated items, or a JSON list (starts with '[').

    Items stay strings: the field's type converts them ("8" to 8 for list[int]) and its error names
    the field and the item. Anything but a string passes through to the field's own validation."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]  # a lone number from a file: `sweep_m = 16`
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"expected comma-separated items or a JSON list, got {value!r} ({exc})") from None
        if not isinstance(items, list):
            raise ValueError(f"expected comma-separated items or a JSON list, got {value!r}")
        return items
    return [item.strip() for item in text.split(",") if item.strip()]


# List settings. NoDecode: pydantic-settings would JSON-decode a list's environment variable before
# any validator sees it, so `REEMBED_TEXT_FIELDS=title,text` failed with a SettingsError traceback;
# the raw string reaches split_list instead, as a flag's or a file's string does.
StrList = Annotated[list[str], NoDecode, BeforeValidator(split_list)]
IntList = Annotated[list[int], NoDecode, BeforeValidator(split_list)]


def check_backend(backend: str, device: str, dtype: str) -> None:
    """Refuse combinations that cannot run, before any work: raises ValueError naming the field."""
    if backend == "openvino":
        raise ValueError(
            "backend: 'openvino' is not available in this build: sentence-transformers reaches OpenVINO through "
            "optimum-intel, which pins another torch than this project's; use --backend onnx for int8 on the CPU"
        )
    if backend != "torch":
        module, extra = BACKEND_MODULES[backend]
        if device == "cuda":
            raise ValueError(f"backend: {backend!r} is the CPU int8 backend, expected device cpu or auto, got 'cuda'")
        if dtype not in ("auto", "float32"):
            raise ValueError(
                f"dtype: the {backend!r} backend runs int8 weights with float32 activations, "
                f"expected auto or float32, got {dtype!r}"
            )
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"backend: {backend!r} needs the {module!r} package, which is not installed; "
                f"pip install 'reembed[{extra}]' or use --backend torch"
            )
    if device == "cpu" and dtype == "float16":
        raise ValueError(
            "dtype: float16 on the CPU is emulated and slower than float32, expected auto, float32 or bfloat16 "
            "with device cpu, got 'float16'"
        )


class BackfillConfig(BaseSettings):
    """Everything `python -m jobs.backfill` needs. Field names are the CLI flags with _ for -."""

    model_config = SettingsConfigDict(env_prefix="REEMBED_", extra="forbid")

    input: str = Field(..., description="JSONL/Parquet file, directory, or pyarrow filesystem URI")
    id_field: str = "_id"
    text_fields: StrList = Field(default_factory=lambda: ["title", "text"])
    partition_by: str | None = None
    partitions: int = Field(1, ge=1, le=1024)

    model: str = DEFAULT_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Dtype = Field("auto", description="model dtype: auto is float16 on CUDA, float32 on the CPU")
    backend: Backend = Field("torch", description="torch, or a CPU int8 backend: onnx, openvino")
    precision: JobPrecision = Field(
        "int8", description="int8 codes, float32, or binary sign bits (needs BINARY_VECTOR; keeps re-rank copies)"
    )
    rerank: bool = Field(
        False,
        description="also keep float16 re-rank copies of the vectors: the service searches in two stages "
        "(codes, then floats); implied by precision binary",
    )
    int8_scheme: Int8Scheme = "global"
    calibration_sample: int = Field(1024, ge=16, le=1_000_000)
    calibration_quantile: float = Field(0.9999, gt=0.5, le=1.0)

    milvus_uri: str = DEFAULT_MILVUS_URI
    milvus_token: str | None = None
    collection: str = DEFAULT_COLLECTION
    hnsw_m: int = Field(32, ge=4, le=64)
    hnsw_ef_construction: int = Field(200, ge=8, le=1024)

    actors: int | None = Field(
        None, ge=1, le=1024, description="embedding actors (default: one per GPU, else per core)"
    )
    threads_per_actor: int | None = Field(
        None, ge=1, le=256, description="torch threads per CPU actor (default 1: batch-invariant codes)"
    )
    batch_size: BatchSize = Field(64, description="texts per forward pass, or 'auto' (probed per actor, cached)")
    actors_per_gpu: int = Field(
        1, ge=1, le=64, description="embedding actors sharing one GPU (each asks Ray for 1/N of a GPU)"
    )
    writers: int | None = Field(
        None, ge=1, le=256, description="writer actors (default: one per GPU, else one per 8 CPU embedding actors)"
    )
    write_batch_rows: int = Field(512, ge=1, le=10_000)
    max_text_bytes: int = Field(65_535, ge=256, le=65_535)
    write_mode: WriteMode = Field(
        "upsert", description="upsert: streaming, idempotent; bulk: Parquet files + server import (new collection)"
    )
    bulk_dir: str | None = Field(
        None, description="bulk: where Parquet files are staged, readable by the Milvus server"
    )
    bulk_storage_root: str | None = Field(
        None, description="bulk: where the server's bucket is mounted; files are named relative to it (else absolute)"
    )
    bulk_file_rows: int = Field(50_000, ge=1, le=10_000_000, description="bulk: rows per staged batch of files")

    output_dir: str = Field("./data/runs", description="run manifests, rejects and the resume record")

    full: bool = Field(False, description="re-embed every document, not only new and changed ones")
    delete_missing: bool = Field(False, description="delete stored documents that the input no longer has")
    max_delete_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="--delete-missing refuses to delete more than this share of the collection"
    )
    shard_bytes: int | None = Field(
        None, ge=1024, le=1 << 34, description="input bytes per shard (default: about 8 shards per actor)"
    )
    checkpoint_interval_s: float = Field(
        30.0, gt=0, le=86_400, description="how often finished shards are flushed and recorded for resume"
    )
    dashboard: bool = Field(
        False,
        description="start the Ray dashboard with a local Ray the job starts itself (about 1 s of start-up); "
        "a job submitted to a cluster uses the cluster's dashboard",
    )

    @field_validator("text_fields")
    @classmethod
    def _check_fields(cls, value: list[str]) -> list[str]:
        return check_text_fields(value)

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, value: str) -> str:
        if not MILVUS_NAME_RE.match(value):
            raise ValueError(
                f"collection: expected letters, digits and underscores, not starting with a digit "
                f"(Milvus's rule), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_compute(self) -> BackfillConfig:
        check_backend(self.backend, self.device, self.dtype)
        if self.actors_per_gpu > 1 and (self.device == "cpu" or self.backend != "torch"):
            raise ValueError(
                f"actors_per_gpu: shares a GPU between actors, expected 1 with device={self.device!r} "
                f"and backend={self.backend!r}, got {self.actors_per_gpu}"
            )
        return self

    @model_validator(mode="after")
    def _check_rerank(self) -> BackfillConfig:
        self.rerank = rerank_rule(self.precision, self.rerank)
        if self.rerank and self.write_mode == "bulk":
            raise ValueError(
                "rerank: bulk import does not stage re-rank copies; use write_mode upsert for int8 + rerank or binary"
            )
        return self

    @model_validator(mode="after")
    def _check_partitioning(self) -> BackfillConfig:
        if self.partition_by and self.partitions != 1:
            raise ValueError(
                f"partition_by={self.partition_by!r} and partitions={self.partitions} are exclusive: "
                "choose one partitioning scheme"
            )
        if self.write_mode == "bulk" and is_lite_uri(self.milvus_uri):
            raise ValueError(
                f"write_mode: bulk needs a Milvus server; Milvus Lite ({self.milvus_uri!r}) has no bulk import, "
                "use write_mode upsert with a .db"
            )
        return self


def check_text_fields(value: list[str]) -> list[str]:
    """At least one field name, none blank (a JSON list can carry " " where a comma list cannot)."""
    value = [v.strip() for v in value]
    if not value or not all(value):
        raise ValueError(f"text_fields: expected at least one field name, none blank, got {value!r}")
    return value


T = TypeVar("T", bound=BaseSettings)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML settings file into a dict of field values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file: expected an existing file, got {str(p)!r}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # each parser has its own error type
        raise ConfigError(f"config file {str(p)!r}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at top level, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def rerank_rule(precision: str, rerank: bool) -> bool:
    """Whether a collection of `precision` keeps re-rank copies: binary always does (sign bits alone
    lose too much to rank by, README: quality table); float32 cannot (its vectors are the floats)."""
    if precision == "binary":
        return True
    if rerank and precision == "float32":
        raise ValueError("rerank: float32 vectors are their own re-rank copies; expected int8 or binary precision")
    return rerank


def load_settings(cls: type[T], flags: dict[str, Any], config_file: str | Path | None = None) -> T:
    """Build `cls` from flags over the file over the environment over defaults.

    Flags whose value is None are treated as not given. Init values beat environment variables in
    pydantic-settings, so merging file then flags into the init values gives the precedence.
    """
    values = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']} (got {err.get('input')!r}"
            f"{_env_source(cls, err['loc'], values)})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid {cls.__name__}: {problems}") from None
    except SettingsError as exc:
        # A value pydantic-settings could not read from the environment (the list settings take
        # theirs raw, so this is a field added without StrList/IntList): its message names the field.
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from None


def _env_source(cls: type[BaseSettings], loc: tuple[Any, ...], values: dict[str, Any]) -> str:
    """`, from REEMBED_X` where the bad value came from the environment (so the user knows where to
    look), else an empty string."""
    if not loc or not isinstance(loc[0], str) or loc[0] in values:
        return ""
    name = (str(cls.model_config.get("env_prefix", "")) + loc[0]).lower()
    found = next((key for key in os.environ if key.lower() == name), None)
    return f", from {found}" if found else ""


class ServiceConfig(BaseSettings):
    """Everything the search service needs: `serve run serve.app:build_app key=value ...`,
    the `args:` of serve/config.yaml, or `REEMBED_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="REEMBED_", extra="forbid")

    milvus_uri: str = DEFAULT_MILVUS_URI
    milvus_token: str | None = None
    collection: str = Field(DEFAULT_COLLECTION, description="collection or alias to search")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Query embedding deployment: dynamic batching and autoscaling.
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="@serve.batch's wait for a fuller batch; 0: none (batches that wait for the model are "
        "merged anyway, see serve/coalesce.py)",
    )
    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int = Field(2, ge=1, le=1024)
    target_ongoing_requests: float = Field(16, gt=0, le=10_000)
    embedder_num_cpus: float = Field(
        1.0, gt=0, le=256, description="CPUs per CPU replica (and, unless embedder_threads, its torch threads)"
    )
    embedder_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch threads per CPU replica (default: int(embedder_num_cpus)); more than its CPUs speeds "
        "a lone query on idle cores and slows a loaded service whose other deployments share them (README)",
    )
    embedder_num_gpus: float | None = Field(
        None, ge=0, le=8, description="GPUs per replica (default: 1 where the cluster has GPUs, else 0)"
    )
    ingress_replicas: int = Field(1, ge=1, le=1024)
    embed_in: Literal["embedder", "ingress"] = Field(
        "embedder",
        description="where queries are embedded: a QueryEmbedder deployment of its own (GPU replicas, scaled "
        "apart from the ingress), or each ingress replica itself (CPU services: no call between replicas, "
        "which took ~3 ms a query on 2 cores; the ingress then takes the embedder's CPUs, GPUs and threads, "
        "and autoscales with min_replicas/max_replicas instead of ingress_replicas)",
    )
    ingress_num_cpus: float = Field(0.5, gt=0, le=64, description="CPUs per ingress replica (mostly waits on I/O)")

    cache_size: int = Field(10_000, ge=0, le=10_000_000, description="query embeddings kept; 0 disables")

    # Request bounds.
    default_k: int = Field(10, ge=1, le=16_384)
    max_k: int = Field(100, ge=1, le=16_384)
    default_ef: int = Field(64, ge=1, le=32_768)
    max_ef: int = Field(1024, ge=1, le=32_768)
    max_query_chars: int = Field(2048, ge=1, le=1_000_000)
    max_batch_queries: int = Field(64, ge=1, le=10_000)
    output_fields: StrList = Field(default_factory=lambda: ["text", "partition"])

    rescore_multiplier: int = Field(
        DEFAULT_RESCORE_MULTIPLIER,
        ge=1,
        le=1024,
        description="two-stage collections (re-rank copies kept): the first stage fetches k x this by code",
    )

    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` on /search")
    search_timeout_s: float = Field(5.0, gt=0, le=600)
    identity_refresh_s: float = Field(2.0, gt=0, le=3600, description="how often an alias's target is re-read")

    @field_validator("output_fields")
    @classmethod
    def _check_output_fields(cls, value: list[str]) -> list[str]:
        value = [v.strip() for v in value]
        if not all(value):
            raise ValueError(f"output_fields: expected field names, none blank, got {value!r}")
        return value

    @property
    def embedder_torch_threads(self) -> int:
        """Torch threads of a CPU embedder replica."""
        return self.embedder_threads or max(1, int(self.embedder_num_cpus))

    @model_validator(mode="after")
    def _check_bounds(self) -> ServiceConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        if self.default_ef > self.max_ef:
            raise ValueError(f"default_ef ({self.default_ef}) must be <= max_ef ({self.max_ef})")
        lite_db = is_lite_uri(self.milvus_uri)
        if self.embed_in == "ingress" and "ingress_replicas" in self.model_fields_set and self.ingress_replicas != 1:
            raise ValueError(
                f"ingress_replicas: with embed_in=ingress the ingress autoscales with min_replicas/max_replicas; "
                f"expected it unset, got {self.ingress_replicas}"
            )
        if self.embed_in == "ingress" and lite_db and "max_replicas" in self.model_fields_set and self.max_replicas > 1:
            raise ValueError(
                f"max_replicas: a Milvus Lite .db is opened by one process, so with embed_in=ingress expected 1 "
                f"with milvus_uri={self.milvus_uri!r}, got {self.max_replicas}; run `milvus-lite server` or a Milvus "
                "server and pass its URI to scale out"
            )
        if lite_db and self.ingress_replicas != 1:
            raise ValueError(
                f"ingress_replicas: a Milvus Lite .db is opened by one process, so expected 1 with "
                f"milvus_uri={self.milvus_uri!r}, got {self.ingress_replicas}; run `milvus-lite server` "
                "or a Milvus server and pass its URI to scale out"
            )
        return self


class EvaluateConfig(BaseSettings):
    """Everything `python -m jobs.evaluate` needs; `REEMBED_EVAL_*` environment variables too.

    The evaluation drops and rebuilds its own collections, `<collection_prefix>_float32`, `_int8`,
    `_binary` and `_hnsw`, so their prefix has an environment variable of its own."""

    model_config = SettingsConfigDict(env_prefix="REEMBED_EVAL_", extra="forbid")

    beir: str = Field(..., description="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    split: str = "test"
    json_out: str = Field(..., description="where the JSON report goes")
    plot: str | None = Field(None, description="HNSW sweep PNG (default: beside the JSON, .hnsw.png)")
    milvus_uri: str = "./data/evaluate/evaluate.db"
    milvus_token: str | None = None
    collection_prefix: str = "eval"
    model: str = DEFAULT_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"

    ef: int = Field(64, ge=1, le=32_768, description="HNSW ef of the precision comparison (the service's default)")
    # k * multiplier at depth 100 must stay within Milvus's search limit of 16384.
    rescore_multiplier: int = Field(DEFAULT_RESCORE_MULTIPLIER, ge=1, le=163)
    calibration_sample: int = Field(1024, ge=16, le=1_000_000)
    calibration_quantile: float = Field(0.9999, gt=0.5, le=1.0)
    hnsw_m: int = Field(32, ge=4, le=64)
    hnsw_ef_construction: int = Field(200, ge=8, le=1024)

    sweep: bool = True
    sweep_m: IntList = Field(default_factory=lambda: [8, 16, 32, 64])
    sweep_ef_construction: IntList = Field(default_factory=lambda: [64, 200])
    sweep_ef: IntList = Field(default_factory=lambda: [10, 16, 32, 64, 128, 256])

    actors: int | None = Field(None, ge=1, le=1024)
    threads_per_actor: int | None = Field(None, ge=1, le=256)
    batch_size: int = Field(64, ge=1, le=4096)
    output_dir: str = "./data/runs"

    @field_validator("sweep_m")
    @classmethod
    def _check_m(cls, value: list[int]) -> list[int]:
        if not value or any(not 4 <= m <= 64 for m in value):
            raise ValueError(f"sweep_m: expected HNSW M values in 4..64, got {value!r}")
        return value

    @field_validator("sweep_ef_construction", "sweep_ef")
    @classmethod
    def _check_positive(cls, value: list[int]) -> list[int]:
        if not value or any(not 1 <= v <= 32_768 for v in value):
            raise ValueError(f"expected values in 1..32768, got {value!r}")
        return value

    @field_validator("collection_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not MILVUS_NAME_RE.match(value + "_float32"):
            raise ValueError(
                f"collection_prefix: expected letters, digits and underscores, not starting with a digit, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_beir(self) -> EvaluateConfig:
        root = Path(self.beir)
        missing = [
            name for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{self.split}.tsv") if not (root / name).is_file()
        ]
        if missing:
            raise ValueError(f"beir: expected a BEIR folder holding {', '.join(missing)}, got {self.beir!r}")
        return self


MigrateAction = Literal["build", "status", "rollback", "switch_to", "drop", "keep"]
# `{alias}_v{N}` must stay a valid Milvus name: leave room for the suffix.
ALIAS_MAX_CHARS = 240
# MigrateConfig's settings that the backfill job building a version takes as they are.
_BACKFILL_SETTINGS = (
    *("input", "id_field", "text_fields", "partition_by", "partitions", "device", "precision", "rerank"),
    "int8_scheme",
    *("calibration_sample", "calibration_quantile", "milvus_token", "hnsw_m", "hnsw_ef_construction", "actors"),
    *("threads_per_actor", "batch_size", "dtype", "backend", "actors_per_gpu", "writers", "max_text_bytes"),
    "output_dir",
)


class MigrateConfig(BaseSettings):
    """Everything `python -m jobs.migrate` needs; `REEMBED_*` environment variables too.

    One action per run: build the next version (`input` and `to_model`, optionally `switch`),
    `status`, `rollback`, `switch_to` a built version, `drop` one version, or `keep` the newest N.
    The backfill settings below are handed to the job that builds the version."""

    model_config = SettingsConfigDict(env_prefix="REEMBED_", extra="forbid")

    alias: str = Field(..., description="the alias the service queries; versions are <alias>_v<N>")
    input: str | None = Field(None, description="the corpus to build the next version from")
    to_model: str | None = Field(None, description="hub name or local path of the next version's model")
    precision: JobPrecision = Field(
        "int8", description="of the new version: int8, float32, or binary sign bits (needs BINARY_VECTOR)"
    )
    rerank: bool = Field(
        False, description="the new version keeps float16 re-rank copies (two-stage search); implied by binary"
    )
    milvus_uri: str = DEFAULT_MILVUS_URI
    milvus_token: str | None = None
    registry: str = Field("reembed_versions", description="collection holding the version records")

    switch: bool = Field(False, description="move the alias to the new version if its gate passes")
    status: bool = False
    rollback: bool = False
    switch_to: int | None = Field(None, ge=0, description="point the alias at this built version")
    drop: int | None = Field(None, ge=0, description="drop this version's collection")
    keep: int | None = Field(None, ge=0, le=10_000, description="drop all but the newest N versions")

    # The gate: golden queries given, or sampled from the corpus.
    queries: str | None = Field(None, description="BEIR queries.jsonl for the gate")
    qrels: str | None = Field(None, description="BEIR qrels TSV (query-id, corpus-id, score)")
    gate_queries: int = Field(100, ge=1, le=100_000, description="golden queries used (a seeded sample)")
    gate_seed: int = 0
    gate_k: int = Field(10, ge=1, le=1000)
    gate_ef: int = Field(64, ge=1, le=32_768, description="HNSW ef of the gate's searches (the service's default)")
    gate_rescore_multiplier: int = Field(
        DEFAULT_RESCORE_MULTIPLIER,
        ge=1,
        le=1024,
        description="two-stage versions: candidates per result, as the service's rescore_multiplier",
    )
    gate_min_ann_recall: float | None = Field(0.95, ge=0, le=1)
    gate_max_ndcg_drop: float | None = Field(0.02, ge=0, le=1)
    gate_min_ndcg: float | None = Field(None, ge=0, le=1)
    gate_min_overlap: float | None = Field(None, ge=0, le=1)
    gate_max_search_p95_ms: float | None = Field(250.0, gt=0)
    gate_max_row_diff: float | None = Field(0.0, ge=0)
    gate_exact_max_rows: int = Field(1_000_000, ge=1, description="exact search for ann_recall up to this many rows")

    # Handed to the backfill job.
    id_field: str = "_id"
    text_fields: StrList = Field(default_factory=lambda: ["title", "text"])
    partition_by: str | None = None
    partitions: int = Field(1, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    int8_scheme: Int8Scheme = "global"
    calibration_sample: int = Field(1024, ge=16, le=1_000_000)
    calibration_quantile: float = Field(0.9999, gt=0.5, le=1.0)
    hnsw_m: int = Field(32, ge=4, le=64)
    hnsw_ef_construction: int = Field(200, ge=8, le=1024)
    actors: int | None = Field(None, ge=1, le=1024)
    threads_per_actor: int | None = Field(None, ge=1, le=256)
    batch_size: BatchSize = Field(64, description="texts per forward pass, or 'auto' (probed per actor, cached)")
    dtype: Dtype = "auto"
    backend: Backend = "torch"
    actors_per_gpu: int = Field(1, ge=1, le=64)
    writers: int | None = Field(None, ge=1, le=256)
    max_text_bytes: int = Field(65_535, ge=256, le=65_535)
    output_dir: str = "./data/runs"

    _check_text_fields = field_validator("text_fields")(check_text_fields)

    @field_validator("alias", "registry")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not MILVUS_NAME_RE.match(value) or len(value) > ALIAS_MAX_CHARS:
            raise ValueError(
                f"expected letters, digits and underscores, not starting with a digit, at most {ALIAS_MAX_CHARS} "
                f"characters, got {value!r}"
            )
        return value

    @property
    def action(self) -> MigrateAction:
        """What this run does; `keep` given with a build applies after the build's switch."""
        chosen = self.actions()
        if chosen:
            return chosen[0]
        return "build" if self.input is not None else "keep"

    def actions(self) -> list[MigrateAction]:
        flags: dict[MigrateAction, bool] = {
            "status": self.status,
            "rollback": self.rollback,
            "switch_to": self.switch_to is not None,
            "drop": self.drop is not None,
        }
        return [name for name, on in flags.items() if on]

    @model_validator(mode="after")
    def _check_action(self) -> MigrateConfig:
        chosen = self.actions()
        if len(chosen) > 1:
            raise ValueError(f"expected one of status, rollback, switch_to, drop, got {', '.join(chosen)}")
        building = not chosen and (self.input is not None or self.to_model is not None)
        if not chosen and not building and self.keep is None:
            raise ValueError(
                "nothing to do: give input and to_model to build a version, or one of status, rollback, switch_to, "
                "drop, keep"
            )
        if self.switch and not building:
            raise ValueError(
                "switch: moves the alias to the version this run builds (input and to_model); use switch_to N"
            )
        if building and (self.input is None or self.to_model is None):
            missing = "input" if self.input is None else "to_model"
            raise ValueError(f"{missing}: building a version needs both input and to_model")
        if chosen and (self.input is not None or self.to_model is not None or self.switch or self.keep is not None):
            raise ValueError(f"{chosen[0]} takes no input, to_model, switch or keep")
        check_backend(self.backend, self.device, self.dtype)
        self.rerank = rerank_rule(self.precision, self.rerank)
        if self.qrels and not self.queries:
            raise ValueError("qrels: judgements need their queries too (queries=BEIR queries.jsonl)")
        for name in ("queries", "qrels"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: expected an existing file, got {path!r}")
        return self

    def backfill_settings(self, collection: str, milvus_uri: str) -> dict[str, Any]:
        """The backfill job's settings for building `collection`."""
        return {
            **{name: getattr(self, name) for name in _BACKFILL_SETTINGS},
            "model": self.to_model,
            "collection": collection,
            "milvus_uri": milvus_uri,
        }


def _doc_counts(value: Any) -> Any:
    """Document counts: 1M,10M or 2500000, from a comma list, a JSON list or a file's list."""
    items = split_list(value)
    if not isinstance(items, list):
        return items
    out = []
    for item in items:
        if not isinstance(item, str):
            out.append(item)  # a number: the field's type checks it
            continue
        part = item.strip().upper().replace("_", "")
        scale = {"K": 1_000, "M": 1_000_000, "B": 1_000_000_000}.get(part[-1:], 1)
        try:
            out.append(int(float(part[:-1] if scale != 1 else part) * scale))
        except ValueError:
            raise ValueError(f"docs: expected counts like 1M,10M or 2500000, got {value!r}") from None
    return out


class PlanConfig(BaseSettings):
    """Everything `python -m jobs.plan` needs: corpus, model, a measured throughput, the deployment."""

    model_config = SettingsConfigDict(env_prefix="REEMBED_PLAN_", extra="forbid")

    docs: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1_000_000, 10_000_000, 100_000_000])
    tokens_per_doc: float | None = Field(None, gt=0, le=1_000_000, description="mean tokens per document")
    model: str = DEFAULT_MODEL
    dimension: int | None = Field(None, ge=1, le=65_536, description="default: from the model")
    docs_per_s: float | None = Field(None, gt=0)
    tokens_per_s: float | None = Field(None, gt=0)
    from_benchmark: str | None = Field(None, description="JSON from benchmarks/throughput.py or a job's summary")
    device: Literal["gpu", "cpu"] | None = None
    cores: int = Field(1, ge=1, le=4096, description="CPU cores the measurement used (CPU core-hours)")
    workers: int = Field(1, ge=1, le=100_000, description="GPUs (or CPU machines) embedding in parallel")
    gpu_hour_usd: float | None = Field(None, ge=0, description="price of one device-hour")
    hnsw_m: int = Field(32, ge=4, le=64)
    replicas: int = Field(1, ge=1, le=64)
    text_bytes: float | None = Field(None, ge=0, le=65_535, description="stored text per row (default 4 x tokens)")
    int8_as_float: bool = Field(False, description="Milvus < 2.6 / Lite: int8 codes stored as FLOAT_VECTOR")

    _split_docs = field_validator("docs", mode="before")(_doc_counts)

    @field_validator("docs")
    @classmethod
    def _check_docs(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError(f"docs: expected positive document counts, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_throughput(self) -> PlanConfig:
        given = [n for n in ("docs_per_s", "tokens_per_s", "from_benchmark") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "throughput: expected exactly one of --docs-per-s, --tokens-per-s, --from-benchmark, "
                f"got {given or 'none'}"
            )
        if self.from_benchmark is not None and not Path(self.from_benchmark).is_file():
            raise ValueError(f"from_benchmark: expected an existing JSON file, got {self.from_benchmark!r}")
        return self
