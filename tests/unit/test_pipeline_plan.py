import pytest

from jobs.pipeline import io_reserve_cpus, plan_compute
from reembed.errors import ConfigError


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("writers", [1, 2, 3, 8])
def test_cpu_actors_always_leave_room_for_reads_and_writes(cpus, writers):
    reserve = io_reserve_cpus(writers)  # reads, change detectors, writers
    if cpus - reserve < 0.05 * cpus:
        with pytest.raises(ConfigError, match="fewer --writers"):
            plan_compute(None, "auto", 64, writers, 512, None, shape=(float(cpus), 0, 1))
        return
    plan = plan_compute(None, "auto", 64, writers, 512, None, shape=(float(cpus), 0, 1))
    assert plan.device == "cpu" and plan.actors == cpus and plan.threads_per_actor == 1
    used = plan.actors * plan.cpus_per_actor + reserve
    assert used <= cpus  # otherwise Ray Data cannot schedule a read and the job waits forever


def test_one_actor_per_gpu_where_there_are_gpus():
    plan = plan_compute(None, "auto", 256, 2, 512, None, shape=(32.0, 4, 2))
    assert (plan.actors, plan.gpus_per_actor, plan.device) == (4, 1.0, "cuda")
    cpu_only = plan_compute(None, "cpu", 64, 2, 512, None, shape=(32.0, 4, 2))
    assert cpu_only.device == "cpu" and cpu_only.gpus_per_actor == 0.0


@pytest.mark.parametrize(
    ("shape", "device", "actors", "expected"),
    [
        ((2.0, 0, 1), "auto", None, 1),  # 2 CPU actors: one writer (a second one slowed the job here)
        ((16.0, 0, 1), "auto", None, 2),  # 16 CPU actors
        ((64.0, 0, 4), "auto", None, 8),
        ((32.0, 4, 2), "auto", None, 4),  # one per GPU
        ((32.0, 4, 2), "cpu", 9, 2),
    ],
)
def test_writers_by_default_scale_with_the_embedding_actors(shape, device, actors, expected):
    plan = plan_compute(actors, device, 64, None, 512, None, shape=shape)
    assert plan.writers == expected
    assert plan_compute(actors, device, 64, 3, 512, None, shape=shape).writers == 3  # asked for: kept


def test_milvus_lite_is_refused_on_a_multi_node_cluster():
    import pytest

    from jobs.backfill import refuse_lite_on_cluster
    from reembed.errors import ConfigError

    refuse_lite_on_cluster("./data/reembed.db", 1)
    refuse_lite_on_cluster("http://milvus:19530", 4)
    with pytest.raises(ConfigError, match="milvus_uri: .* 3 nodes"):
        refuse_lite_on_cluster("./data/reembed.db", 3)


def test_the_calibration_sample_is_the_first_good_documents_read_in_the_driver(tmp_path):
    """Across shards, without rejects or repeated ids, and no further than the sample needs."""
    import json

    from jobs.pipeline import read_sample
    from reembed.documents import C_ID, DocumentSpec
    from reembed.inputs import inspect_input
    from reembed.shards import plan_shards

    rows = [{"_id": f"d{i}", "text": f"text {i}"} for i in range(40)]
    rows[1] = {"_id": "d1", "text": ""}  # rejected: no text
    rows[3] = {"_id": "d2", "text": "again"}  # d2 twice: both copies are rejected
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    plan = inspect_input(str(src), "_id", ["title", "text"], None)
    shards, _ = plan_shards(plan, 128)
    assert len(shards) > 3  # the sample spans several shards
    spec = DocumentSpec()
    sample = read_sample(shards, plan.filesystem, spec, 10, {"d2": 2})
    assert sample.column(C_ID).to_pylist() == ["d0", *(f"d{i}" for i in range(4, 13))]
    everything = read_sample(shards, plan.filesystem, spec, 1000, {"d2": 2})
    assert everything.num_rows == 37
    assert read_sample([], plan.filesystem, spec, 10) is None


def test_the_driver_embeds_the_calibration_sample_with_every_core(tmp_path):
    """Learning the model's identity must not leave the driver on one thread for the sample after it
    (it did: 1,024 documents took 62 s instead of ~35 s on 2 cores)."""
    import json

    import numpy as np
    import torch

    from jobs.pipeline import driver_cores, read_sample, sample_embeddings
    from reembed.documents import DocumentSpec
    from reembed.embedder import describe_model
    from reembed.inputs import inspect_input
    from reembed.shards import plan_shards

    rows = [{"_id": f"d{i}", "text": f"a short document number {i} about wings"} for i in range(6)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = inspect_input(str(src), "_id", ["title", "text"], None)
    shards, _ = plan_shards(plan, 1 << 20)
    sample = read_sample(shards, plan.filesystem, DocumentSpec(), 4)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        source, identity = describe_model("sentence-transformers/all-MiniLM-L6-v2")
        assert torch.get_num_threads() == 3  # left as it was

        torch.set_num_threads(1)
        compute = plan_compute(None, "cpu", 64, None, 512, None, shape=(2.0, 0, 1))
        floats = sample_embeddings(sample, source, compute)
        assert torch.get_num_threads() == driver_cores()
    finally:
        torch.set_num_threads(before)
    assert floats.shape == (4, identity.dimension)
    assert np.allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-5)
