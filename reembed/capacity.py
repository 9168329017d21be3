"""Capacity planning: how long a backfill takes and how much memory Milvus needs to serve it.

Sits beside the flow, not in it: `python -m jobs.plan` calls `plan_capacity` with a corpus size,
a mean token count, a model's dimension and a measured throughput (from the job's summary or
`benchmarks/throughput.py`), and prints the result for 1M, 10M and 100M documents.

Compute. Embedding cost grows with tokens, not documents, so a throughput is kept as tokens/s:
ETA = docs x tokens_per_doc / (tokens_per_s x workers), assuming workers scale linearly (they
share nothing but the writers). Device-hours = ETA x workers (x cores per worker on CPUs).

Memory per loaded replica, per vector, with d the dimension and M the HNSW parameter:

    vector       float32 4d, float16 2d, int8 d (INT8_VECTOR, Milvus 2.6+), binary d/8 bytes
    rerank       binary only: the float16 copy kept for re-ranking, stored base64 (4 ceil(2d/3))
    hnsw graph   (2M x 4 + 4)                   layer 0: up to 2M neighbour ids of 4 bytes + a count
                 + 8 + 8 + 4                    label, pointer to the upper layers, level
                 + (M x 4 + 4) / (M - 1)        upper layers: M links each; a vector reaches layer
                                                l >= 1 with probability M^-l, so on average
                                                sum_l M^-l = 1 / (M - 1) upper layers
    scalars      id + stored text + 64 (content hash) + partition name + 16 (row id, timestamp)
                 + 4 per variable-length field (offsets)

The graph terms follow hnswlib's layout (`hnswalg.h`: size_links_level0_, size_data_per_element_,
size_links_per_element_), which Milvus's HNSW (knowhere) uses; the level distribution is the HNSW
paper's (Malkov & Yashunin, 2018, mL = 1 / ln M). The HNSW index holds the vectors themselves, so
they are counted once. Int8 codes on a Milvus older than 2.6 (and on Milvus Lite) go into a
FLOAT_VECTOR field and take 4d bytes like float32: `int8_as_float=True` says so. Replicas
multiply everything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from reembed.errors import ConfigError

PlanPrecision = Literal["float32", "float16", "int8", "binary+rerank"]
PRECISIONS: tuple[PlanPrecision, ...] = ("float32", "float16", "int8", "binary+rerank")
DEFAULT_DOC_COUNTS = (1_000_000, 10_000_000, 100_000_000)
# English WordPiece averages about four UTF-8 bytes of text per token.
TEXT_BYTES_PER_TOKEN = 4.0
HASH_BYTES = 64
ROW_OVERHEAD_BYTES = 16  # Milvus's row id and timestamp
VARCHAR_OFFSET_BYTES = 4
VARCHAR_FIELDS = 4  # id, text, hash, partition

# Output dimension of models users name often; anything else is loaded (offline) to learn it.
KNOWN_DIMENSIONS = {
    "sentence-transformers/all-MiniLM-L6-v2": 384,
    "sentence-transformers/all-MiniLM-L12-v2": 384,
    "sentence-transformers/all-mpnet-base-v2": 768,
    "sentence-transformers/multi-qa-MiniLM-L6-cos-v1": 384,
    "BAAI/bge-small-en-v1.5": 384,
    "BAAI/bge-base-en-v1.5": 768,
    "BAAI/bge-large-en-v1.5": 1024,
    "intfloat/e5-small-v2": 384,
    "intfloat/e5-base-v2": 768,
    "intfloat/e5-large-v2": 1024,
}


def _check(name: str, value: float, low: float, what: str = "a number") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
        raise ConfigError(f"{name}: expected {what} >= {low:g}, got {value!r}")


def hnsw_graph_bytes_per_vector(m: int) -> float:
    """Bytes of HNSW graph per vector for parameter M (module docstring: the formula and its source)."""
    _check("hnsw_m", m, 2, "an integer")
    layer0 = 2 * m * 4 + 4
    element = 8 + 8 + 4
    upper = (m * 4 + 4) / (m - 1)
    return layer0 + element + upper


def vector_bytes(dimension: int, precision: PlanPrecision, int8_as_float: bool = False) -> float:
    """Bytes one vector takes in the index; binary+rerank adds the float16 re-rank copy (base64)."""
    _check("dimension", dimension, 1, "an integer")
    if precision == "float32":
        return 4.0 * dimension
    if precision == "float16":
        return 2.0 * dimension
    if precision == "int8":
        return (4.0 if int8_as_float else 1.0) * dimension
    if precision == "binary+rerank":
        return dimension / 8 + 4 * math.ceil(2 * dimension / 3)
    raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")


def scalar_bytes_per_row(text_bytes: float, id_bytes: float = 16, partition_bytes: float = 10) -> float:
    """Bytes of the scalar fields one row keeps loaded: id, stored text, hash, partition, Milvus's own."""
    return (
        id_bytes
        + text_bytes
        + HASH_BYTES
        + partition_bytes
        + ROW_OVERHEAD_BYTES
        + VARCHAR_FIELDS * VARCHAR_OFFSET_BYTES
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for `docs` documents at one precision, per replica and in all (x replicas)."""

    precision: str
    vectors: float
    graph: float
    scalars: float
    replicas: int

    @property
    def per_replica(self) -> float:
        return self.vectors + self.graph + self.scalars

    @property
    def total(self) -> float:
        return self.per_replica * self.replicas

    def to_dict(self) -> dict:
        return {**asdict(self), "per_replica": self.per_replica, "total": self.total}


def memory_estimate(
    docs: int,
    dimension: int,
    precision: PlanPrecision,
    hnsw_m: int = 32,
    text_bytes: float = 0.0,
    replicas: int = 1,
    int8_as_float: bool = False,
) -> MemoryEstimate:
    """Milvus memory for `docs` vectors at `precision` (module docstring: what each term counts)."""
    _check("docs", docs, 0, "an integer")
    _check("replicas", replicas, 1, "an integer")
    return MemoryEstimate(
        precision=precision,
        vectors=docs * vector_bytes(dimension, precision, int8_as_float),
        graph=docs * hnsw_graph_bytes_per_vector(hnsw_m),
        scalars=docs * scalar_bytes_per_row(text_bytes),
        replicas=replicas,
    )


@dataclass(frozen=True)
class Throughput:
    """A measured embedding rate of one worker (one GPU, or one CPU machine of `cores` cores)."""

    tokens_per_s: float
    device: Literal["gpu", "cpu"] = "gpu"
    cores: int = 1

    @classmethod
    def from_docs_per_s(
        cls, docs_per_s: float, tokens_per_doc: float, device: Literal["gpu", "cpu"] = "gpu", cores: int = 1
    ) -> Throughput:
        """docs/s measured on documents of `tokens_per_doc` tokens on average."""
        _check("docs_per_s", docs_per_s, 1e-9)
        _check("tokens_per_doc", tokens_per_doc, 1e-9)
        return cls(docs_per_s * tokens_per_doc, device, cores)


@dataclass(frozen=True)
class ComputeEstimate:
    docs: int
    tokens: float
    seconds: float
    device_hours: float
    device: str
    workers: int
    cost_usd: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compute_estimate(
    docs: int, tokens_per_doc: float, throughput: Throughput, workers: int = 1, hour_usd: float | None = None
) -> ComputeEstimate:
    """Wall time with `workers` workers in parallel, and device-hours (GPU-hours or CPU core-hours)."""
    _check("docs", docs, 0, "an integer")
    _check("tokens_per_doc", tokens_per_doc, 1e-9)
    _check("tokens_per_s", throughput.tokens_per_s, 1e-9)
    _check("workers", workers, 1, "an integer")
    tokens = docs * tokens_per_doc
    seconds = tokens / (throughput.tokens_per_s * workers)
    per_worker = 1 if throughput.device == "gpu" else throughput.cores
    hours = seconds / 3600 * workers * per_worker
    cost = None if hour_usd is None else hours * hour_usd
    return ComputeEstimate(docs, tokens, seconds, hours, throughput.device, workers, cost)


@dataclass(frozen=True)
class CapacityPlan:
    model: str
    dimension: int
    tokens_per_doc: float
    throughput: Throughput
    hnsw_m: int
    replicas: int
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dimension": self.dimension,
            "tokens_per_doc": self.tokens_per_doc,
            "throughput": asdict(self.throughput),
            "hnsw_m": self.hnsw_m,
            "replicas": self.replicas,
            "rows": self.rows,
        }


def plan_capacity(
    doc_counts: tuple[int, ...],
    tokens_per_doc: float,
    dimension: int,
    throughput: Throughput,
    workers: int = 1,
    hnsw_m: int = 32,
    replicas: int = 1,
    hour_usd: float | None = None,
    text_bytes: float | None = None,
    model: str = "",
    int8_as_float: bool = False,
) -> CapacityPlan:
    """One row per corpus size: compute (ETA, device-hours, cost) and memory at every precision."""
    if not doc_counts:
        raise ConfigError("docs: expected at least one corpus size, got none")
    text = tokens_per_doc * TEXT_BYTES_PER_TOKEN if text_bytes is None else text_bytes
    rows = []
    for docs in doc_counts:
        compute = compute_estimate(docs, tokens_per_doc, throughput, workers, hour_usd)
        memory = {
            p: memory_estimate(docs, dimension, p, hnsw_m, text, replicas, int8_as_float).to_dict() for p in PRECISIONS
        }
        rows.append({"docs": docs, "compute": compute.to_dict(), "memory": memory})
    return CapacityPlan(model, dimension, tokens_per_doc, throughput, hnsw_m, replicas, rows)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def format_plan(plan: CapacityPlan) -> str:
    """A table for people: one line per corpus size."""
    unit = "GPU-h" if plan.throughput.device == "gpu" else "core-h"
    head = f"{'docs':>12} {'ETA':>9} {unit:>10}" + "".join(f" {p:>14}" for p in PRECISIONS)
    lines = [
        f"model {plan.model or '?'} (d={plan.dimension}), {plan.tokens_per_doc:g} tokens/doc, "
        f"{plan.throughput.tokens_per_s:,.0f} tokens/s per {plan.throughput.device} worker, HNSW M={plan.hnsw_m}, "
        f"{plan.replicas} replica(s); memory = vectors + HNSW graph + scalar fields, all replicas",
        head,
    ]
    for row in plan.rows:
        c = row["compute"]
        mem = "".join(f" {format_bytes(row['memory'][p]['total']):>14}" for p in PRECISIONS)
        cost = f"  ${c['cost_usd']:,.0f}" if c["cost_usd"] is not None else ""
        lines.append(f"{row['docs']:>12,} {format_duration(c['seconds']):>9} {c['device_hours']:>10,.1f}{mem}{cost}")
    return "\n".join(lines)
