"""The one place that builds the Ray Data pipeline and sets map_batches arguments.

shards -> read + normalise + validate (tasks) -> find what changed (actors, one Milvus lookup per
block) -> embed + quantise (actor pool, one GPU each where there are GPUs) -> upsert into Milvus
(writer actors) -> a small summary stream that the driver aggregates. Vectors never pass
through the driver.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data

from reembed.documents import C_ID, C_REJECT, C_SHARD, C_STATUS, S_ERROR, S_NEW, S_REJECTED, DocumentSpec
from reembed.embedder import ModelSource, resolve_dtype
from reembed.errors import ConfigError
from reembed.ingest import C_VECTOR, EMBED_STATUSES, BatchWriter, ChangeDetector, DocumentEncoder
from reembed.shards import Shard, read_shard

# Readers and writers mostly wait on I/O; small CPU shares let them run beside the embedding
# actors, which use every core through torch threads, without Ray starving one of them.
READ_NUM_CPUS = 0.25
SHUFFLE_BYTES_PER_PARTITION = 256 << 20
# Up to this much input the ids are counted in the driver (a few MB of strings) instead of by a
# shuffle, whose operators take seconds to start: most of a small run's start-up otherwise.
DRIVER_ID_COUNT_BYTES = 64 << 20
WRITER_NUM_CPUS = 0.1
DETECTOR_NUM_CPUS = 0.05
# Rows handed to an embedding actor at once (x batch size); the embedder buckets them by length
# inside. Small on CPUs so that the last calls of a run spread over every actor; larger on GPUs,
# which want long queues.
ROWS_PER_CALL_FACTOR = {"cpu": 1, "cuda": 4}
# With --batch-size auto the size is found inside each actor; the rows per call are then fixed
# here, large enough for the probe to try every size up to its cap (reembed/batching.py).
AUTO_ROWS_PER_CALL = {"cpu": 128, "cuda": 4096}
MAX_READ_BLOCKS = 20_000


@dataclass(frozen=True)
class ComputePlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    device: str
    batch_size: int | str  # a number, or "auto": each actor finds it (reembed/batching.py)
    writers: int
    write_batch_rows: int
    threads_per_actor: int = 1
    dtype: str = "float32"  # resolved: never "auto"
    backend: str = "torch"

    @property
    def rows_per_call(self) -> int:
        return rows_per_call(self.batch_size, self.device)


def rows_per_call(batch_size: int | str, device: str) -> int:
    """Rows an embedding actor on `device` gets per call with this batch size ("auto" included)."""
    if batch_size == "auto":
        return AUTO_ROWS_PER_CALL.get(device, AUTO_ROWS_PER_CALL["cpu"])
    return int(batch_size) * ROWS_PER_CALL_FACTOR.get(device, 1)


def cluster_shape() -> tuple[float, int, int]:
    """(CPUs, GPUs, alive nodes) of the Ray cluster this driver is connected to."""
    resources = ray.cluster_resources()
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    return float(resources.get("CPU", 1)), int(resources.get("GPU", 0)), nodes


def io_reserve_cpus(writers: int) -> float:
    """CPUs a node keeps free beside the embedding actors: reads, change detectors, writers."""
    return 2 * READ_NUM_CPUS + writers * (WRITER_NUM_CPUS + DETECTOR_NUM_CPUS) + 0.05


# CPU embedding actors per writer actor: a writer upserts thousands of rows a second, a CPU actor
# embeds tens. On 2 cores a second writer (and change detector) measurably slowed the job down.
CPU_ACTORS_PER_WRITER = 8


def default_writers(actors: int, gpus: int, use_gpu: bool) -> int:
    """Writer actors when none are asked for: one per GPU, else one per CPU_ACTORS_PER_WRITER actors."""
    if use_gpu:
        return max(1, gpus)
    return max(1, math.ceil(actors / CPU_ACTORS_PER_WRITER))


def plan_compute(
    actors: int | None,
    device: str,
    batch_size: int | str,
    writers: int | None,
    write_batch_rows: int,
    threads_per_actor: int | None,
    shape: tuple[float, int, int] | None = None,
    actors_per_gpu: int = 1,
    dtype: str = "auto",
    backend: str = "torch",
) -> ComputePlan:
    """`actors_per_gpu` actors per GPU where the cluster has GPUs; else one single-threaded actor per core.

    Several actors on one GPU (each asking Ray for 1/N of it) overlap one actor's tokenisation and
    host-device copies with another's forward pass. Single-threaded CPU actors keep embeddings
    bit-identical however rows are batched (see reembed/embedder.py) and scale without intra-op
    synchronisation. The CPU int8 backends never take a GPU.
    """
    cpus, gpus, nodes = shape or cluster_shape()
    use_gpu = backend == "torch" and (device == "cuda" or (device == "auto" and gpus > 0))
    threads = threads_per_actor or 1
    if use_gpu:
        n_actors, cpus_per_actor = actors or max(1, gpus) * actors_per_gpu, 1.0
        writers = writers or default_writers(n_actors, gpus, True)
    else:
        n_actors = actors or max(1, int(cpus // threads))
        writers = writers or default_writers(n_actors, gpus, False)
        per_node = math.ceil(n_actors / nodes)
        # Leave each node room for a read task, a parse task, the change detectors and the writers
        # (counted as if all landed on it): if the actors held every CPU, Ray Data could never
        # schedule a read.
        io_reserve = io_reserve_cpus(writers)
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
        cpus_per_actor=math.floor(cpus_per_actor * 1000) / 1000,  # never round up past the reserve
        gpus_per_actor=gpu_share(actors_per_gpu) if use_gpu else 0.0,
        device="cuda" if use_gpu else "cpu",
        batch_size=batch_size,
        writers=writers,
        write_batch_rows=write_batch_rows,
        threads_per_actor=threads,
        dtype=resolve_dtype(dtype, "cuda" if use_gpu else "cpu"),
        backend=backend,
    )


def gpu_share(actors_per_gpu: int) -> float:
    """The GPU fraction each of N actors asks Ray for: 1/N rounded down to Ray's 1e-4 resource
    granularity, so that N of them always fit on one GPU (3 x 0.3333 <= 1)."""
    if actors_per_gpu < 1:
        raise ConfigError(f"actors_per_gpu: expected a positive integer, got {actors_per_gpu!r}")
    return math.floor(10_000 / actors_per_gpu) / 10_000


def read_documents(
    shards: list[Shard], fs: pafs.FileSystem, spec: DocumentSpec, duplicates: dict[str, int] | None = None
) -> ray.data.Dataset:
    """Shards -> a dataset of DOC_COLUMNS: documents, rejects and one end-of-shard row per shard.

    One read task per shard (per few shards past MAX_READ_BLOCKS), each with a small CPU share:
    Ray's own readers list files in tasks that ask for a whole CPU, which the embedding actors
    may hold. A shard's rows stay in one block, so a small input still reaches every actor.
    """
    dup = duplicates or {}

    def read(batch: pa.Table) -> Iterator[pa.Table]:
        for text in batch.column("shard").to_pylist():
            yield from read_shard(fs, Shard.from_json(text), spec, dup)

    items = ray.data.from_items(
        [{"shard": s.to_json()} for s in shards], override_num_blocks=max(1, min(len(shards), MAX_READ_BLOCKS))
    )
    return items.map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


def _new_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column(C_STATUS), S_NEW))


def read_good_rows(
    shards: list[Shard], fs: pafs.FileSystem, spec: DocumentSpec, duplicates: dict[str, int] | None = None
) -> Iterator[pa.Table]:
    """Good documents of the shards, read in the driver, table by table (rejects and end-of-shard
    rows left out); a consumer that stops early reads no further."""
    for shard in shards:
        for table in read_shard(fs, shard, spec, duplicates):
            good = _new_rows(table)
            if good.num_rows:
                yield good


def new_documents(docs: ray.data.Dataset) -> ray.data.Dataset:
    """Good documents as read (before change detection), without rejects or end-of-shard rows.
    A map with a small CPU share: Ray's filter would ask for a whole CPU per task, which the
    embedding actors may already hold, and wait forever."""
    return docs.map_batches(_new_rows, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


@dataclass
class InputCensus:
    """What the whole input holds, read before any work: the job's view of "the input".

    Taken over every shard, those the resume record skips included, so that repeated ids are found
    across the whole input (a resumed run rejects exactly what an uninterrupted one would), the
    input's document count is known on every run (the migration gate checks a version against it),
    and `--delete-missing` and moves act only when every shard was read whole (`failed` is empty).
    """

    rows: int = 0  # records (non-blank lines, Parquet rows), good or rejected
    good: int = 0  # records that are documents, before repeated ids are rejected
    duplicates: dict[str, int] = field(default_factory=dict)  # id -> copies, for ids seen more than once
    failed: dict[str, str] = field(default_factory=dict)  # shard key -> why it could not be read whole
    ids: set[str] | None = None  # every id the input names (good or rejected), for an input read in the driver
    id_rows: ray.data.Dataset | None = None  # the same as a dataset of _census_rows, for one read by Ray Data

    @property
    def documents(self) -> int:
        """Documents the collection must hold after a complete run: good rows less every repeated copy."""
        return self.good - sum(self.duplicates.values())

    @property
    def complete(self) -> bool:
        return not self.failed

    def summary(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "documents": self.documents,
            "rejected": self.rows - self.documents,
            "complete": self.complete,
            "unreadable_shards": dict(self.failed),
        }


def _census_rows(table: pa.Table) -> pa.Table:
    """A document table -> (id, kind, reason): 0 good, 1 rejected (id may be ""), 2 a shard that
    failed (id: the shard key); end-of-shard markers are left out."""
    status = table.column(C_STATUS)
    good = pc.equal(status, S_NEW)
    rejected = pc.equal(status, S_REJECTED)
    failed = pc.equal(status, S_ERROR)
    kind = pc.if_else(good, 0, pc.if_else(rejected, 1, 2)).cast(pa.int8())
    keep = pc.or_(pc.or_(good, rejected), failed)
    ids = pc.if_else(failed, table.column(C_SHARD), table.column(C_ID))
    return pa.table({C_ID: ids, "kind": kind, C_REJECT: table.column(C_REJECT)}).filter(keep)


def take_census(shards: list[Shard], fs: pafs.FileSystem, spec: DocumentSpec, input_bytes: int) -> InputCensus:
    """Read every shard once, ids only kept: counts, repeated ids, unreadable shards (`InputCensus`).

    An input of at most DRIVER_ID_COUNT_BYTES is read in the driver itself (7,000 documents: 0.07 s,
    against 2.7 s for the same read as a Ray Data pass), which also keeps its ids for
    `--delete-missing`; a larger one is read by Ray Data tasks and its ids counted by a shuffle.
    """
    census = InputCensus()
    if input_bytes <= DRIVER_ID_COUNT_BYTES:
        counts: dict[str, int] = {}
        census.ids = set()
        for shard in shards:
            for table in read_shard(fs, shard, spec):
                rows = _census_rows(table)
                for doc_id, kind, reason in zip(
                    *(rows.column(c).to_pylist() for c in (C_ID, "kind", C_REJECT)), strict=True
                ):
                    if kind == 2:
                        census.failed[doc_id] = reason
                        continue
                    census.rows += 1
                    if doc_id:
                        census.ids.add(doc_id)
                    if kind == 0:
                        census.good += 1
                        counts[doc_id] = counts.get(doc_id, 0) + 1
        census.duplicates = {k: n for k, n in counts.items() if n > 1}
        return census
    rows = read_documents(shards, fs, spec).map_batches(_census_rows, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)
    rows = rows.materialize()  # read once, counted three ways below (and kept for --delete-missing)
    census.id_rows = rows
    for r in _of_kind(rows, 2).take_all():
        census.failed[r[C_ID]] = r[C_REJECT]
    by_kind = {int(r["kind"]): int(r["count()"]) for r in rows.groupby("kind").count().take_all()}
    census.rows, census.good = by_kind.get(0, 0) + by_kind.get(1, 0), by_kind.get(0, 0)
    # Ray's default of 200 shuffle partitions costs seconds of task overhead on a small corpus.
    partitions = max(1, min(200, input_bytes // SHUFFLE_BYTES_PER_PARTITION))
    good = _of_kind(rows, 0).select_columns([C_ID])
    counts_ds = good.groupby(C_ID, num_partitions=partitions).count()
    repeated = counts_ds.map_batches(_repeated_ids, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)
    census.duplicates = {r[C_ID]: int(r["count()"]) for r in repeated.take_all()}
    return census


def _of_kind(rows: ray.data.Dataset, kind: int) -> ray.data.Dataset:
    """Census rows of one kind: a map with a small CPU share (Ray's filter asks for a whole CPU)."""

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.equal(batch.column("kind"), kind))

    return rows.map_batches(keep, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


def _repeated_ids(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.greater(batch.column("count()"), 1))


def detect_changes(
    docs: ray.data.Dataset,
    uri: str,
    token: str | None,
    collection: str,
    keep_unchanged_text: bool,
    compute: ComputePlan,
    allow_moves: bool = True,
    per_partition: bool = False,
) -> ray.data.Dataset:
    """Mark rows unchanged / changed / moved against the collection: one lookup per block (moves
    rejected instead where `allow_moves` is False: reembed.ingest.ChangeDetector)."""
    return docs.map_batches(
        ChangeDetector,
        fn_constructor_kwargs={
            "uri": uri,
            "token": token,
            "collection": collection,
            "keep_unchanged_text": keep_unchanged_text,
            "allow_moves": allow_moves,
            "per_partition": per_partition,
        },
        batch_size=None,  # a block at a time: blocks stay shard-sized for the embedding actors
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=compute.writers),
        num_cpus=DETECTOR_NUM_CPUS,
    )


def embed(
    docs: ray.data.Dataset,
    source: ModelSource,
    precision: str,
    calibration_json: str | None,
    compute: ComputePlan,
    embed_statuses: tuple[str, ...] = EMBED_STATUSES,
    rerank: bool = False,
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
            "dtype": compute.dtype,
            "backend": compute.backend,
            "embed_statuses": embed_statuses,
            "rerank": rerank,
        },
        batch_size=compute.rows_per_call,
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
    compute: ComputePlan,
    embed_statuses: tuple[str, ...] = EMBED_STATUSES,
) -> ray.data.Dataset:
    return vectors.map_batches(
        BatchWriter,
        fn_constructor_kwargs={
            "uri": uri,
            "token": token,
            "collection": collection,
            "vector_type": vector_type,
            "max_text_bytes": max_text_bytes,
            "embed_statuses": embed_statuses,
        },
        batch_size=compute.write_batch_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=compute.writers),
        num_cpus=WRITER_NUM_CPUS,
    )


def read_sample(
    shards: list[Shard], fs: pafs.FileSystem, spec: DocumentSpec, size: int, duplicates: dict[str, int] | None = None
) -> pa.Table | None:
    """The first `size` good documents of the shards, read in the driver: the int8 calibration sample.

    The driver reads only as far as the sample goes (shards stream batch by batch); a Ray Data
    pass for the same rows cost 3-4 s of scheduling on a small run. Repeated ids are left out as
    the job rejects them, so the sample holds exactly what the actors will embed.
    """
    parts: list[pa.Table] = []
    n = 0
    for good in read_good_rows(shards, fs, spec, duplicates):
        parts.append(good.slice(0, size - n))
        n += parts[-1].num_rows
        if n >= size:
            break
    return pa.concat_tables(parts) if parts else None


def _numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def driver_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sample_embeddings(sample: pa.Table | None, source: ModelSource, compute: ComputePlan) -> np.ndarray:
    """Float embeddings of the calibration sample (`read_sample`)."""
    if sample is None or not sample.num_rows:
        return np.empty((0, 0), dtype=np.float32)
    if compute.device == "cpu":
        # On CPUs the driver embeds the sample itself, with every core it has (the actors are not
        # started yet): starting an actor pool for a thousand documents (processes, torch import,
        # model load) costs more than that. Only the scale comes out of these floats: the last bit
        # that several threads may change in them moves it by a rounding error, and it is fitted once.
        encoder = DocumentEncoder(
            source, "float32", None, device="cpu", batch_size=compute.batch_size, threads=driver_cores()
        )
        step = compute.rows_per_call
        batches = [encoder(_numpy_batch(sample.slice(i, step))) for i in range(0, sample.num_rows, step)]
    else:
        floats = embed(ray.data.from_arrow(sample), source, "float32", None, compute)
        batches = floats.select_columns([C_VECTOR, C_STATUS]).iter_batches(batch_format="numpy")
    # A row the model could not take is a reject with a zero vector: it says nothing of the scale.
    return np.concatenate([b[C_VECTOR][b[C_STATUS] != S_REJECTED] for b in batches])


def iter_summaries(results: ray.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    yield from results.iter_batches(batch_format="numpy", batch_size=None)


def _tagged(tag: int):
    def add(batch: pa.Table) -> pa.Table:
        return pa.table({C_ID: batch.column(C_ID), "tag": pa.array([tag] * batch.num_rows, pa.int8())})

    return add


def input_ids(census_rows: ray.data.Dataset) -> ray.data.Dataset:
    """Every id the input names (good or rejected), tagged 0: what `--delete-missing` must keep."""

    def ids(batch: pa.Table) -> pa.Table:
        named = batch.filter(pc.and_(pc.less(batch.column("kind"), 2), pc.not_equal(batch.column(C_ID), "")))
        return _tagged(0)(named.select([C_ID]))

    return census_rows.map_batches(ids, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


def stored_ids(uri: str, token: str | None, collection: str, partitions: list[str]) -> ray.data.Dataset:
    """Every id the collection holds, tagged 1, streamed partition by partition in small-CPU tasks."""

    def read(batch: pa.Table) -> Iterator[pa.Table]:
        from reembed.store import MilvusStore

        store = MilvusStore(uri, token)
        try:
            for partition in batch.column("partition").to_pylist():
                for chunk in store.iter_ids(collection, partition=partition):
                    yield _tagged(1)(pa.table({C_ID: pa.array(chunk, pa.string())}))
        finally:
            store.close()

    items = ray.data.from_items([{"partition": p} for p in partitions], override_num_blocks=max(1, len(partitions)))
    return items.map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


def missing_ids(stored: ray.data.Dataset, present: ray.data.Dataset, input_bytes: int) -> list[str]:
    """Stored ids that the input no longer names: ids whose every occurrence is tagged 1 (stored).

    The same grouped shuffle of short strings as the duplicate pass (Ray's join would need polars);
    only the missing ids reach the driver.
    """
    from ray.data.aggregate import Min

    partitions = max(1, min(200, input_bytes // SHUFFLE_BYTES_PER_PARTITION))
    grouped = stored.union(present).groupby(C_ID, num_partitions=partitions).aggregate(Min("tag"))

    def only_stored(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.equal(batch.column("min(tag)"), 1)).select([C_ID])

    gone = grouped.map_batches(only_stored, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)
    return [r[C_ID] for r in gone.take_all()]


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
