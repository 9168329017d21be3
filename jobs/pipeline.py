"""The one place that builds the Ray Data pipeline and sets map_batches arguments.

files -> read (tasks) -> normalise + validate (tasks) -> embed + quantise (actor pool, one GPU
each where there are GPUs) -> upsert into Milvus (writer actors) -> a small summary stream that the
driver aggregates. Vectors never pass through the driver.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from reembed.documents import (
    C_ID,
    C_REJECT,
    DocumentSpec,
    mark_duplicates,
    normalize_json_lines,
    normalize_records,
)
from reembed.embedder import ModelSource
from reembed.errors import ConfigError
from reembed.ingest import C_VECTOR, BatchWriter, DocumentEncoder
from reembed.inputs import InputPlan

# Readers and writers mostly wait on I/O; small CPU shares let them run beside the embedding
# actors, which use every core through torch threads, without Ray starving one of them.
READ_NUM_CPUS = 0.25
SHUFFLE_BYTES_PER_PARTITION = 256 << 20
WRITER_NUM_CPUS = 0.1
# Rows handed to an embedding actor at once; the embedder buckets them by length inside.
ROWS_PER_ACTOR_CALL_FACTOR = 4


@dataclass(frozen=True)
class ComputePlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    device: str
    batch_size: int
    writers: int
    write_batch_rows: int
    threads_per_actor: int = 1


def cluster_shape() -> tuple[float, int, int]:
    """(CPUs, GPUs, alive nodes) of the Ray cluster this driver is connected to."""
    resources = ray.cluster_resources()
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    return float(resources.get("CPU", 1)), int(resources.get("GPU", 0)), nodes


def plan_compute(
    actors: int | None,
    device: str,
    batch_size: int,
    writers: int,
    write_batch_rows: int,
    threads_per_actor: int | None,
    shape: tuple[float, int, int] | None = None,
) -> ComputePlan:
    """One GPU per actor where the cluster has GPUs; else one single-threaded actor per core.

    Single-threaded CPU actors keep embeddings bit-identical however rows are batched (see
    reembed/embedder.py) and scale without intra-op synchronisation.
    """
    cpus, gpus, nodes = shape or cluster_shape()
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    threads = threads_per_actor or 1
    if use_gpu:
        n_actors, cpus_per_actor = actors or gpus, 1.0
    else:
        n_actors = actors or max(1, int(cpus // threads))
        per_node = math.ceil(n_actors / nodes)
        # Leave each node room for a read task, a parse task and the writers (counted as if all
        # landed on it): if the actors held every CPU, Ray Data could never schedule a read.
        io_reserve = 2 * READ_NUM_CPUS + writers * WRITER_NUM_CPUS + 0.05
        spare = cpus / nodes - io_reserve
        if spare < 0.05 * per_node:
            raise ConfigError(
                f"writers: {writers} writers plus reading need {io_reserve:.2f} CPU per node, leaving too "
                f"little for {per_node} embedding actor(s) on nodes of {cpus / nodes:g} CPUs; use fewer --writers "
                "or --actors"
            )
        cpus_per_actor = min(float(threads), spare / per_node)
    return ComputePlan(
        actors=n_actors,
        cpus_per_actor=round(cpus_per_actor, 3),
        gpus_per_actor=1.0 if use_gpu else 0.0,
        device="cuda" if use_gpu else "cpu",
        batch_size=batch_size,
        writers=writers,
        write_batch_rows=write_batch_rows,
        threads_per_actor=threads,
    )


def read_documents(plan: InputPlan, spec: DocumentSpec, duplicates: dict[str, int] | None = None) -> ray.data.Dataset:
    """Input files -> a dataset of DOC_COLUMNS (good documents and rejects side by side)."""
    dup = duplicates or {}
    parts = []
    if plan.jsonl_files:

        def from_lines(batch: pa.Table) -> pa.Table:
            table = normalize_json_lines(batch.column("text").to_pylist(), batch.column("path").to_pylist(), spec)
            return mark_duplicates(table, dup)

        lines = ray.data.read_text(
            plan.jsonl_files, filesystem=plan.filesystem, include_paths=True, num_cpus=READ_NUM_CPUS
        )
        parts.append(lines.map_batches(from_lines, batch_format="pyarrow", num_cpus=READ_NUM_CPUS))
    if plan.parquet_files:
        wanted = [f for f in {spec.id_field, *spec.text_fields, spec.partition_by} if f and f in plan.fields_seen]

        fs = plan.filesystem

        def from_files(batch: pa.Table):
            # Each task reads its Parquet files row group by row group. Ray's read_parquet lists
            # files in a task that asks for a whole CPU, which the embedding actors may hold.
            for path in batch.column("path").to_pylist():
                with fs.open_input_file(path) as fh:
                    parquet = pq.ParquetFile(fh)
                    columns = [c for c in wanted if c in parquet.schema_arrow.names]
                    for record_batch in parquet.iter_batches(batch_size=4096, columns=columns):
                        table = pa.Table.from_batches([record_batch])
                        yield mark_duplicates(normalize_records(table.to_pylist(), [path] * table.num_rows, spec), dup)

        files = ray.data.from_items(
            [{"path": p} for p in plan.parquet_files], override_num_blocks=len(plan.parquet_files)
        )
        parts.append(files.map_batches(from_files, batch_size=1, batch_format="pyarrow", num_cpus=READ_NUM_CPUS))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _good_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column(C_REJECT), ""))


def good_documents(docs: ray.data.Dataset) -> ray.data.Dataset:
    """Documents without a reject reason. A map with a small CPU share: Ray's filter would ask for a
    whole CPU per task, which the embedding actors may already hold, and wait forever."""
    return docs.map_batches(_good_rows, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


def count_duplicate_ids(docs: ray.data.Dataset, input_bytes: int) -> dict[str, int]:
    """Ids that appear more than once among good documents, with their counts.

    A pass over the ids alone (a shuffle of short strings), so that every copy of a repeated id
    is rejected the same way whatever the order in which blocks arrive.
    """
    ids = good_documents(docs).select_columns([C_ID])
    # Ray's default of 200 shuffle partitions costs seconds of task overhead on a small corpus.
    partitions = max(1, min(200, input_bytes // SHUFFLE_BYTES_PER_PARTITION))
    counts = ids.groupby(C_ID, num_partitions=partitions).count()
    repeated = counts.map_batches(_repeated_ids, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)
    return {r[C_ID]: int(r["count()"]) for r in repeated.take_all()}


def _repeated_ids(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.greater(batch.column("count()"), 1))


def embed(
    docs: ray.data.Dataset, source: ModelSource, precision: str, calibration_json: str | None, compute: ComputePlan
) -> ray.data.Dataset:
    return docs.map_batches(
        DocumentEncoder,
        fn_constructor_kwargs={
            "source": source,
            "precision": precision,
            "calibration_json": calibration_json,
            "device": compute.device,
            "batch_size": compute.batch_size,
            "threads": compute.threads_per_actor,
        },
        batch_size=compute.batch_size * ROWS_PER_ACTOR_CALL_FACTOR,
        batch_format="numpy",
        # One call in flight per actor: otherwise the first actor to start queues the first blocks
        # and, on a small input, the others sit idle (measured: one of two cores doing all the work).
        compute=ray.data.ActorPoolStrategy(size=compute.actors, max_tasks_in_flight_per_actor=1),
        num_gpus=compute.gpus_per_actor,
        num_cpus=compute.cpus_per_actor,
    )


def write(
    vectors: ray.data.Dataset,
    uri: str,
    token: str | None,
    collection: str,
    vector_type: str,
    max_text_bytes: int,
    partition_by_field: bool,
    compute: ComputePlan,
) -> ray.data.Dataset:
    return vectors.map_batches(
        BatchWriter,
        fn_constructor_kwargs={
            "uri": uri,
            "token": token,
            "collection": collection,
            "vector_type": vector_type,
            "max_text_bytes": max_text_bytes,
            "partition_by_field": partition_by_field,
        },
        batch_size=compute.write_batch_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=compute.writers),
        num_cpus=WRITER_NUM_CPUS,
    )


def sample_embeddings(docs: ray.data.Dataset, size: int, source: ModelSource, compute: ComputePlan) -> np.ndarray:
    """Float embeddings of the first `size` good documents: the int8 calibration sample."""
    sample = good_documents(docs).limit(size)
    floats = embed(sample, source, "float32", None, compute)
    parts = [b[C_VECTOR] for b in floats.select_columns([C_VECTOR]).iter_batches(batch_format="numpy")]
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def iter_summaries(results: ray.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    yield from results.iter_batches(batch_format="numpy", batch_size=None)


def stage_bulk(
    vectors: ray.data.Dataset,
    uri: str,
    token: str | None,
    collection: str,
    max_text_bytes: int,
    staging: str,
    compute: ComputePlan,
    rows_per_call: int,
) -> ray.data.Dataset:
    """--write-mode bulk: writer actors stage Parquet files (reembed/bulk.py) instead of upserting."""
    from reembed.bulk import BulkStager

    return vectors.map_batches(
        BulkStager,
        fn_constructor_kwargs={
            "uri": uri,
            "token": token,
            "collection": collection,
            "max_text_bytes": max_text_bytes,
            "staging": staging,
        },
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=compute.writers),
        num_cpus=WRITER_NUM_CPUS,
    )
