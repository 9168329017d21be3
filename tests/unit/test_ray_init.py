"""jobs.ray_init: a local Ray whose start-up fails is started once more; a cluster is joined once.

ray.init is replaced here: the GCS start-up race it covers cannot be produced on demand."""

from __future__ import annotations

import pytest
import ray

from jobs.ray_init import init_ray


class FlakyInit:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[dict] = []
        self.shutdowns = 0

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc")

    def shutdown(self):
        self.shutdowns += 1


def test_a_local_start_that_fails_is_tried_once_more(monkeypatch):
    fake = FlakyInit(failures=1)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "shutdown", fake.shutdown)
    init_ray(None, logging_level=30, log_to_driver=True)
    assert fake.calls == [
        {"address": None, "logging_level": 30, "log_to_driver": True},
        {"logging_level": 30, "log_to_driver": True},
    ]
    assert fake.shutdowns == 1


def test_a_second_failure_and_a_cluster_failure_are_raised(monkeypatch):
    fake = FlakyInit(failures=2)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "shutdown", fake.shutdown)
    with pytest.raises(RuntimeError, match="gcs_server_port"):
        init_ray(None)
    assert len(fake.calls) == 2
    cluster = FlakyInit(failures=1)
    monkeypatch.setattr(ray, "init", cluster.init)
    with pytest.raises(RuntimeError, match="gcs_server_port"):
        init_ray("ray://head:10001")
    assert len(cluster.calls) == 1
