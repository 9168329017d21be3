"""Beyond one machine, on one machine: a two-node Ray cluster of its own (`ray start --head` and
`ray start --address`), the backfill submitted with `ray job submit` and read back through the Jobs
API, its actors on both nodes, and the search service deployed with `serve deploy`.

The cluster is private to this test: its own --temp-dir (so no other `ray.init()` on the machine
finds it through /tmp/ray), its own ports, one CPU a node, token auth off (loopback only). It is
stopped by killing the process groups it started and then any process still carrying its temp dir:
never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from reembed.store import F_ID, F_PARTITION, MilvusStore
from tests.conftest import REPO, read_jsonl, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster, pytest.mark.milvus_server]

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
API_KEY = "two-node-key"
DOCS = 80
PORT_NAMES = (
    "node_manager",
    "object_manager",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "runtime_env_agent",
    "metrics_export",
)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_TAKEN: set[int] = set()  # ports this module has handed out: no two components may share one


def _free_ports(count: int) -> list[int]:
    """`count` free ports in a random region well away from Ray's defaults, none handed out before."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(30_000, 59_000)
        if port not in _TAKEN and _port_free(port):
            _TAKEN.add(port)
            ports.append(port)
    return ports


def _free_range(size: int) -> int:
    while True:
        start = random.randint(30_000, 59_000 - size)
        span = range(start, start + size)
        if not _TAKEN.intersection(span) and all(_port_free(p) for p in span):
            _TAKEN.update(span)
            return start


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    ports: dict[str, int]
    log: Path


@dataclass
class TwoNodeCluster:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_node(self, name: str, head: bool) -> Node:
        names = PORT_NAMES + (("ray_client_server",) if head else ())
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        workers = _free_range(200)
        argv = [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0"]
        argv += ["--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir / name)]
        argv += ["--min-worker-port", str(workers), "--max-worker-port", str(workers + 199)]
        argv += ["--disable-usage-stats"]
        for key, port in ports.items():
            argv += [f"--{key.replace('_', '-')}-port", str(port)]
        if head:
            argv += ["--head", "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port)]
            argv += ["--dashboard-host", "127.0.0.1", "--include-dashboard", "true"]
        else:
            argv += ["--address", f"127.0.0.1:{self.gcs_port}"]
        log = self.temp_dir / f"{name}.log"
        with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = Node(name, process, ports, log)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], timeout=10)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Ray daemons may have left the process group: end whatever still carries our temp dir.
        marker = str(self.temp_dir).encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(milvus_server):  # the server first: it takes a fixed port that others may be holding
    # A short path: Ray's unix sockets live under the temp dir and must stay under 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-twonode-", dir="/tmp"))
    gcs_port, dashboard_port = _free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        # Loopback only and private to the test: no token auth, so the cluster neither needs nor touches
        # the machine's shared ~/.ray/auth_token (Ray 2.60 turns token auth on for a new cluster when
        # RAY_AUTH_MODE is unset and a token exists there).
        RAY_AUTH_MODE="disabled",
    )
    c = TwoNodeCluster(temp_dir, gcs_port, dashboard_port, env)
    try:
        c.start_node("head", head=True)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(Exception):  # the dashboard is not up yet
                if c.alive_nodes():
                    break
            if c.nodes[0].process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start: {c.nodes[0].log.read_text()[-3000:]}")
            time.sleep(1)
        c.start_node("worker", head=False)
        while len(c.alive_nodes()) < 2:
            if c.nodes[1].process.poll() is not None or time.monotonic() > deadline + 60:
                pytest.fail(f"ray worker did not join: {c.nodes[1].log.read_text()[-3000:]}")
            time.sleep(1)
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cluster: TwoNodeCluster, submission_id: str, args: list[str]) -> None:
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".git", "data", "benchmarks/out"],
        "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    }
    argv = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id, "--no-wait"]
    argv += ["--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "jobs.backfill", *args]
    done = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_job(client, submission_id: str, timeout: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal() or time.monotonic() > deadline:
            return status, client.get_job_logs(submission_id)
        time.sleep(2)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING)


@pytest.fixture(scope="module")
def backfilled(cluster, milvus_server, cranfield, tmp_path_factory):
    """The backfill, submitted with `ray job submit` to the two-node cluster, into the Milvus server."""
    from ray.job_submission import JobSubmissionClient

    tmp = tmp_path_factory.mktemp("twonode")
    docs = read_jsonl(cranfield / "corpus.jsonl")[:DOCS]
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    args = ["--input", str(corpus), "--milvus-uri", milvus_server, "--collection", "twonode"]
    args += ["--partitions", "2", "--calibration-sample", "32", "--batch-size", "16", "--output-dir", str(tmp / "runs")]
    _submit(cluster, "backfill-twonode", args)
    client = JobSubmissionClient(cluster.dashboard)
    status, logs = _wait_job(client, "backfill-twonode", 480)
    yield {"client": client, "status": status, "logs": logs, "docs": docs, "tmp": tmp}
    store = MilvusStore(milvus_server)
    with contextlib.suppress(Exception):
        store.drop_collection("twonode")
    store.close()


def test_cluster_has_two_nodes_of_its_own(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    assert all(n.resources_total["CPU"] == 1 for n in nodes)
    # Private: its address is under its own temp dir, not where a plain `ray.init()` looks for one.
    assert (cluster.temp_dir / "head" / "ray_current_cluster").read_text().strip().endswith(f":{cluster.gcs_port}")
    default = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    assert not default.exists() or f":{cluster.gcs_port}" not in default.read_text()


def test_backfill_job_succeeds_and_reports_through_the_jobs_api(backfilled, milvus_server):
    from ray.job_submission import JobStatus

    assert backfilled["status"] == JobStatus.SUCCEEDED, backfilled["logs"][-4000:]
    info = backfilled["client"].get_job_info("backfill-twonode")
    assert info.entrypoint.startswith("python -m jobs.backfill")
    summary = json.loads(backfilled["logs"].strip().splitlines()[-1])  # the job's last stdout line
    assert summary["written"] == DOCS and summary["rejected"] == 0
    assert summary["milvus"].startswith("v2.3") and summary["actors"] == 2
    store = MilvusStore(milvus_server)
    try:
        rows = store.query("twonode", f'{F_ID} != ""', [F_ID, F_PARTITION], limit=1000)
        assert sorted(r[F_ID] for r in rows) == sorted(d["_id"] for d in backfilled["docs"])
        assert {r[F_PARTITION] for r in rows} == {"part_0000", "part_0001"}
    finally:
        store.close()


def test_backfill_actors_ran_on_both_nodes(backfilled, cluster):
    from ray.util.state import list_actors

    job_id = backfilled["client"].get_job_info("backfill-twonode").job_id
    actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=1000)
    workers = [a for a in actors if "MapWorker" in a.class_name]
    assert workers, [a.class_name for a in actors]
    # A pool may ask for one more actor than fits; that one never gets a node (node_id None).
    nodes = {a.node_id for a in workers if a.node_id}
    alive = {n.node_id for n in cluster.alive_nodes()}
    assert nodes == alive, f"Ray Data actors on {len(nodes)} of {len(alive)} nodes"


def test_backfill_refuses_a_lite_db_on_the_cluster(backfilled, cluster):
    from ray.job_submission import JobStatus

    tmp = backfilled["tmp"]
    _submit(cluster, "backfill-lite", ["--input", str(tmp / "corpus.jsonl"), "--milvus-uri", str(tmp / "x.db")])
    status, logs = _wait_job(backfilled["client"], "backfill-lite", 300)
    assert status == JobStatus.FAILED
    error = json.loads(logs.strip().splitlines()[-1])["error"]
    assert "the Ray cluster has 2 nodes" in error and "Milvus server URI" in error


def test_search_service_deployed_with_serve_deploy(backfilled, cluster, milvus_server, tmp_path):
    assert backfilled["status"].name == "SUCCEEDED"
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (http_port,) = _free_ports(1)
    # Both nodes share 127.0.0.1 here, so one proxy (on the head) instead of one per node.
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (app,) = config["applications"]
    app["args"].update(
        milvus_uri=milvus_server,
        collection="twonode",
        min_replicas=1,
        max_replicas=1,
        embedder_num_cpus=0.5,
        ingress_num_cpus=0.25,
    )
    # The API key comes from the environment, as on KubeRay from the secret.
    app["runtime_env"] = {"env_vars": {"REEMBED_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(
        [SERVE, "deploy", str(path), "--address", cluster.dashboard],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/readyz", timeout=10).status_code == 200:
                    break
            if time.monotonic() > deadline:
                status = subprocess.run(
                    [SERVE, "status", "--address", cluster.dashboard], env=cluster.env, capture_output=True, text=True
                )
                pytest.fail(f"service not ready: {status.stdout}")
            time.sleep(2)
        doc = backfilled["docs"][7]
        body = {"query": doc["title"], "k": 3}
        assert requests.post(f"{base}/search", json=body, timeout=30).status_code == 401
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(2):  # a miss, then a cache hit
            r = requests.post(f"{base}/search", json=body, headers=headers, timeout=60)
            assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["results"][0]["id"] == doc["_id"] and answer["cache_hits"] == 1
        status = subprocess.run(
            [SERVE, "status", "--address", cluster.dashboard], env=cluster.env, capture_output=True, text=True
        )
        assert yaml.safe_load(status.stdout)["applications"]["reembed"]["status"] == "RUNNING"
        _check_dashboard_metrics(cluster)
    finally:
        subprocess.run(
            [SERVE, "shutdown", "-y", "--address", cluster.dashboard], env=cluster.env, capture_output=True, timeout=120
        )


def _check_dashboard_metrics(cluster: TwoNodeCluster) -> None:
    """Every ray_reembed_* series the Grafana dashboard queries is exported by the cluster's nodes."""
    import re

    dashboard = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    wanted = set(re.findall(r"\b(ray_reembed_[a-z_]+)", re.sub(r"\{[^}]*\}", "", exprs)))
    deadline = time.monotonic() + 60
    while True:
        text = ""
        for node in cluster.nodes:
            with contextlib.suppress(requests.RequestException):
                text += requests.get(f"http://127.0.0.1:{node.ports['metrics_export']}/metrics", timeout=10).text
        exported = set(re.findall(r"^(ray_reembed_[a-z_]+)", text, re.M))
        if wanted <= exported or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert wanted <= exported, f"dashboard queries {sorted(wanted - exported)}, exported: {sorted(exported)}"
