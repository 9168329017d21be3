"""The cluster configs on paper, checked against what they point at: Ray's own schema for
ray_cluster.yaml, the real entrypoints and config classes for the KubeRay manifests, the metric
names Ray and serve/metrics.py export for the Grafana dashboard, and the sizing arithmetic of the
Milvus Helm values."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from jobs.backfill import parse_config
from reembed.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


# --- ray_cluster.yaml --------------------------------------------------------------------------


def test_ray_cluster_yaml_validates_against_the_schema_ray_ships():
    config = load_yaml("ray_cluster.yaml")
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    # Ray's own checks on top of the schema (what `ray up` runs before launching anything).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_ray_cluster_yaml_has_head_cpu_and_gpu_workers_that_install_the_project():
    config = load_yaml("ray_cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert cpu and gpu, "expected a CPU worker type and a GPU worker type"
    for t in cpu + gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert sum(t["min_workers"] for t in cpu + gpu) <= config["max_workers"]
    # The repo is synced and installed on every node (a GPU type's own list replaces the global one).
    assert config["file_mounts"]["~/reembed"] == "."
    for commands in [config["setup_commands"], *[t["worker_setup_commands"] for t in gpu]]:
        assert any("pip install" in c and "-e ." in c for c in commands), commands
        assert any("torch==" in c for c in commands)
    assert "torch==2.13.0" in " ".join(config["setup_commands"])  # the version pyproject pins


def test_every_node_starts_ray_with_the_serve_env():
    """Serve reads its mode when Ray starts on a node: each `ray start` must export all of it, with
    HAProxy (the binary the cluster's ray[serve] bundles) in front of the ingress replicas."""
    from serve.runtime import HAPROXY_ENV, THROUGHPUT_ENV

    config = load_yaml("ray_cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        env, _, _ = start.partition("ray start")
        exported = dict(
            word.split("=", 1)
            for part in env.split(";")
            if part.strip().startswith("export ")
            for word in shlex.split(part)[1:]
        )
        assert exported == {**THROUGHPUT_ENV, **HAPROXY_ENV}, (key, start)


# --- KubeRay -----------------------------------------------------------------------------------


def test_rayjob_runs_the_backfill_entrypoint_with_valid_arguments():
    job = load_yaml("cluster/rayjob-backfill.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.backfill"]
    assert importlib.util.find_spec(argv[2]) is not None
    cfg = parse_config(argv[3:])  # the job's own parser and BackfillConfig validation
    assert cfg.milvus_uri.startswith("http://"), "a cluster job needs a Milvus server, not a Lite .db"
    assert cfg.partitions > 1
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def _serve_apps(text: str) -> list[dict]:
    return yaml.safe_load(text)["applications"]


def test_rayservice_builds_the_real_app_with_valid_args_and_the_api_key_from_a_secret(monkeypatch):
    service = load_yaml("cluster/rayservice-search.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    apps = _serve_apps(service["spec"]["serveConfigV2"])
    # The same applications as the file `serve deploy` takes on a VM cluster.
    assert apps == _serve_apps((CLUSTER / "serve-cluster.yaml").read_text())
    (app,) = apps
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("serve.app", "build_app")
    builder = getattr(importlib.import_module(module), attr)
    assert inspect.signature(builder).parameters["args"].annotation in (ServiceConfig, "ServiceConfig")
    # Every pod gets REEMBED_API_KEY from the secret; ServiceConfig reads it with the args.
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        ref = env["REEMBED_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "reembed-secrets" and ref["key"] == "api-key"
        # Ray's high-throughput Serve on KubeRay: the optimised mode, and HAProxy (direct ingress) on
        # every pod's port 8000 instead of Serve's Python proxy.
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1"
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
    assert "api_key" not in app["args"], "the key belongs in the secret, not in the manifest"
    monkeypatch.setenv("REEMBED_API_KEY", "from-the-secret")
    cfg = ServiceConfig(**app["args"])
    assert cfg.api_key == "from-the-secret"
    assert cfg.milvus_uri.startswith("http://") and cfg.ingress_replicas > 1
    assert cluster["rayVersion"] == ray.__version__


def test_serve_configs_validate_with_service_config():
    for path in (REPO / "serve" / "config.yaml", CLUSTER / "serve-cluster.yaml"):
        for app in _serve_apps(path.read_text()):
            assert app["import_path"] == "serve.app:build_app"
            ServiceConfig(**app["args"])


# --- Grafana -----------------------------------------------------------------------------------


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    return {m for m in re.findall(r"\b(ray_[a-z0-9_]+)", without_labels)}


def _exported_name(name: str, kind: str) -> set[str]:
    """Prometheus names Ray exports for a metric registered as `name`."""
    base = f"ray_{name}"
    if kind == "Counter":
        return {base + "_total"}
    if kind == "Histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


def test_grafana_dashboard_queries_metrics_that_exist():
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(_metric_names(e) for e in exprs))
    # Ours: every metric serve/metrics.py registers is on the dashboard, under its exported name.
    source = (REPO / "serve" / "metrics.py").read_text()
    ours = set()
    for kind, name in re.findall(r"metrics\.(Counter|Histogram|Gauge)\(\s*\"([a-z0-9_]+)\"", source):
        ours |= _exported_name(name, kind)
    assert len(ours) >= 9
    reembed_used = {m for m in used if m.startswith("ray_reembed_")}
    assert reembed_used <= ours, reembed_used - ours
    registered = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in ours}
    assert registered <= {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in reembed_used}
    # Ray's: each name appears in the installed Ray's source (Serve, Data, node metrics).
    ray_root = Path(ray.__file__).parent
    corpus = "".join(
        p.read_text(errors="ignore")
        for sub in ("data/_internal", "serve/_private", "dashboard/modules/metrics/dashboards")
        for p in (ray_root / sub).rglob("*.py")
    )
    for name in sorted(used - reembed_used):
        bare = name.removeprefix("ray_")
        assert name in corpus or f'"{bare}"' in corpus, f"{name} is not a metric of Ray {ray.__version__}"
    assert any(m.startswith("ray_data_") for m in used) and any(m.startswith("ray_serve_") for m in used)


# --- Milvus Helm values: the sizing holds ------------------------------------------------------


def _gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", quantity).groups()
    return float(number) * units[unit]


def test_milvus_values_hold_100m_int8_vectors_in_two_replicas():
    values = load_yaml("cluster/milvus-values.yaml")
    assert values["cluster"]["enabled"] is True
    tag = values["image"]["all"]["tag"]
    major, minor = (int(x) for x in re.match(r"v(\d+)\.(\d+)", tag).groups())
    assert (major, minor) >= (2, 6), "INT8_VECTOR needs Milvus 2.6"
    rows, dim, m = 100_000_000, 384, 32
    hnsw_links = (2 * m * 4 + 4) + (m * 4 + 4) / (m - 1)
    scalars = 24 + 64 + 17
    per_row = dim + hnsw_links + 8 + scalars
    per_replica_gb = rows * per_row * 1.3 / 1e9
    assert 95 < per_replica_gb < 105  # the figure the values file states (99 GB)
    query = values["queryNode"]
    limit_gb = query["replicas"] * _gib(query["resources"]["limits"]["memory"]) * 2**30 / 1e9
    assert limit_gb >= 2 * per_replica_gb * 1.2, "two replicas plus 20% headroom"
    # One query node may restart and the two replicas still fit.
    assert (query["replicas"] - 1) * _gib(query["resources"]["limits"]["memory"]) * 2**30 / 1e9 >= 2 * per_replica_gb
    user = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])
    assert user["queryNode"]["mmap"]["scalarField"] is True  # the text is not in the 99 GB
    assert user["dataCoord"]["segment"]["maxSize"] >= 1024


@pytest.mark.parametrize("name", ["rayjob-backfill.yaml", "rayservice-search.yaml", "milvus-values.yaml"])
def test_manifests_parse(name):
    docs = list(yaml.safe_load_all((CLUSTER / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_runbook_covers_the_operations():
    text = (CLUSTER / "RUNBOOK.md").read_text()
    for heading in (
        "Submit a backfill",
        "Watch it in the Ray dashboard",
        "Migrate a model",
        "Roll back",
        "Back up and restore",
        "Size the cluster",
    ):
        assert re.search(rf"^##+ .*{heading}", text, re.M | re.I), heading
    for command in (
        "ray job submit",
        "python -m jobs.backup snapshot",
        "python -m jobs.backup restore",
        "serve deploy",
    ):
        assert command in text
