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
