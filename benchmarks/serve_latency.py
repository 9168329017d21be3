"""Search latency and throughput of the Serve app against plain encode + MilvusClient.search, one run.

Sits beside the service, not in its flow. One run backfills the cranfield corpus into a fresh
collection (`python -m jobs.backfill`, as a user would), then measures three things with the same
load generator (client threads on loopback, each with its own search loop and, for HTTP, its own
requests.Session; every level bounded by --requests and by --max-seconds):

  baseline  in ONE fresh process: `SentenceTransformer(path).encode([query],
            normalize_embeddings=True)`, the query quantised with the collection's own int8
            calibration (`reembed.search.QueryCodec`), then `MilvusClient(uri).search(...)`; all
            client threads share that one model and that one client, as a naive user's would.
  service   `POST /search` on the Ray Serve app (`serve.app.build_app`) with queries the cache has
            never seen: the 225 cranfield queries in turn, then again with " (2)", " (3)", ...
            appended, so that every request runs the model. The same texts as the baseline's.
  cache     `POST /search` with a few repeated queries, sent once beforehand so that the load is
            answered from the service's embedding cache (checked with /stats and `cache_hits`).

Per level and side: qps (successful requests / wall seconds), client-side p50/p95/p99 latency,
errors (non-200 or exceptions) and, for the service, the medians of its own `timing_ms` (embed,
search, total) and of the time spent outside it (HTTP proxy, routing, client). For context it
also times `GET /healthz` at concurrency 1: the Serve floor (HTTP proxy + ingress, no model, no
Milvus). `targets` compares the two sides from this same run: the service's p50 overhead over
the baseline at concurrency 1 (target <= 5 ms), its qps over the baseline's at concurrency 16
(target > 1) and the errors of all phases (target 0).

Rounds (`--rounds`, default 3): this kind of machine drifts by 20 % and more within minutes, so one
baseline-then-service pass compares two different machines. Each round runs the baseline, then
starts Ray and the service, measures it on new texts and stops it again, back to back; the targets
are the medians of the per-round comparisons (each round's values are in the JSON). The cached
phase and the floor run in the last round. A Milvus Lite .db is opened by one process at a time, so
the baseline runs in a subprocess that exits (and lets go of the .db) before the service starts,
and the service's ingress replica opens it; nothing of the service runs while the baseline does.
With `--milvus-uri http://HOST:PORT` (e.g. `milvus-server`) both sides and the backfill share that
server. The script starts a local Ray of its own each round and shuts Serve and Ray down after it.

Prints progress to stderr and one JSON object as the last line of stdout:

    python benchmarks/serve_latency.py --out benchmarks/out/serve.json
    python benchmarks/serve_latency.py --concurrency 1,4 --requests 60 --rounds 1      # quicker
    python benchmarks/serve_latency.py --milvus-uri http://127.0.0.1:19530 --skip-backfill
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.serve_latency")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = "/work/shared/data/cranfield/corpus.jsonl"
DEFAULT_QUERIES = "/work/shared/data/cranfield/queries.jsonl"
COLLECTION = "bench_serve"
CALIBRATION_SAMPLE = 128
OUTPUT_FIELDS = ["text", "partition"]
# Requests sent on each side before any timing: model first call, Milvus load, HTTP keep-alive.
WARMUP_REQUESTS = 8
CACHE_SET = 10
FLOOR_REQUESTS = 50
REQUEST_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 300.0
TERMINATE_GRACE_S = 60.0
MAX_ERROR_SAMPLES = 5
TARGET_OVERHEAD_MS = 5.0
TARGET_QPS_RATIO = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/serve_latency.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="JSONL documents to backfill (default: cranfield)")
    p.add_argument("--queries", default=DEFAULT_QUERIES, help="JSONL queries with a `text` field (default: cranfield)")
    p.add_argument(
        "--milvus-uri",
        default=None,
        help="a Milvus Lite .db path or http://HOST:PORT of a server (default: a fresh .db in the work dir)",
    )
    p.add_argument("--collection", default=COLLECTION)
    p.add_argument(
        "--skip-backfill", action="store_true", help="search the collection as it is (it must exist already)"
    )
    p.add_argument("--calibration-sample", type=int, default=CALIBRATION_SAMPLE, help="the job's int8 sample")
    p.add_argument("--concurrency", default="1,4,16", help="client threads per level, comma-separated")
    p.add_argument("--requests", type=int, default=150, help="requests per level and side (default %(default)s)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="baseline-then-service passes, back to back; targets are their medians (default %(default)s)",
    )
    p.add_argument(
        "--max-seconds", type=float, default=40.0, help="a level stops here even if requests remain (default 40)"
    )
    p.add_argument("--warmup", type=int, default=WARMUP_REQUESTS, help="untimed requests per side first")
    p.add_argument("--cache-set", type=int, default=CACHE_SET, help="distinct queries in the cached phase")
    p.add_argument("--floor-requests", type=int, default=FLOOR_REQUESTS, help="GET /healthz requests; 0 skips")
    p.add_argument("-k", "--k", type=int, default=10, help="hits per query")
    p.add_argument("--ef", type=int, default=64, help="HNSW ef, both sides (the service's default_ef)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--baseline-threads",
        type=int,
        default=None,
        help="torch threads in the baseline process (default: torch's own, as a naive user gets)",
    )
    p.add_argument("--min-replicas", type=int, default=1, help="query embedder replicas, at least")
    p.add_argument("--max-replicas", type=int, default=1, help="query embedder replicas, at most")
    p.add_argument("--embedder-num-cpus", type=float, default=1.0, help="CPUs (and torch threads) per embedder")
    p.add_argument("--embedder-threads", type=int, default=None, help="torch threads per embedder (the service's)")
    p.add_argument(
        "--ray-serve-defaults",
        action="store_true",
        help="start Ray without serve/runtime.py's settings (Serve's default mode and proxy), for comparison",
    )
    p.add_argument("--ingress-num-cpus", type=float, default=0.5)
    p.add_argument(
        "--embed-in",
        choices=["embedder", "ingress"],
        default=None,
        help="where the service embeds queries (default: the service's, a QueryEmbedder deployment)",
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="embedder @serve.batch size (service default)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=None, help="(default: the service's)")
    p.add_argument("--cache-size", type=int, default=None, help="query embeddings cached (default: the service's)")
    p.add_argument("--port", type=int, default=None, help="HTTP port for Serve (default: a free one)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for the backfill and the baseline")
    p.add_argument(
        "--work-dir", default=None, help="keep the .db, logs and Ray's temp files here (default: a temp dir, removed)"
    )
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--baseline-worker", default=None, help=argparse.SUPPRESS)
    return p


# --- the load generator, shared by both sides --------------------------------------------------

# A worker takes a query text and returns (ok, details): details carries timings the side reports
# (and, on failure, what went wrong). One worker per client thread.
Worker = Callable[[str], tuple[bool, dict[str, Any]]]


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_level(make_worker: Callable[[], Worker], texts: list[str], concurrency: int, max_seconds: float) -> dict:
    """`concurrency` threads take the texts in order until none is left or max_seconds have passed.

    Each thread builds its worker (its own session) before the clock starts. Latency is per
    request on the client; qps counts successful requests over the wall time from the common
    start to the last thread's end.
    """
    lock = threading.Lock()
    cursor = [0]
    clock: dict[str, float] = {}
    records: list[tuple[float, bool, dict[str, Any]]] = []

    def start_clock() -> None:  # runs once, when every thread is at the barrier
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + max_seconds

    barrier = threading.Barrier(concurrency, action=start_clock)
    setup_errors: list[str] = []

    def loop() -> None:
        try:
            worker = make_worker()
        except Exception as exc:
            setup_errors.append(repr(exc))
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        mine = []
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(texts) or time.perf_counter() >= clock["deadline"]:
                break
            t0 = time.perf_counter()
            try:
                ok, details = worker(texts[i])
            except Exception as exc:  # a failed request is a measurement, not a crash
                ok, details = False, {"error": repr(exc)[:300]}
            mine.append(((time.perf_counter() - t0) * 1e3, ok, details))
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=loop, name=f"client-{n}", daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if setup_errors:
        raise RuntimeError(f"a client thread could not start: {setup_errors[0]}")
    wall = time.perf_counter() - clock["start"]
    ok_lat = sorted(lat for lat, ok, _ in records if ok)
    errors = [d for _, ok, d in records if not ok]
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(records),
        "ok": len(ok_lat),
        "errors": len(errors),
        "stopped_by": "requests" if len(records) >= len(texts) else "time",
        "wall_s": _r(wall, 3),
        "qps": _r(len(ok_lat) / wall if wall > 0 else None),
        "p50_ms": _r(_percentile(ok_lat, 50)),
        "p95_ms": _r(_percentile(ok_lat, 95)),
        "p99_ms": _r(_percentile(ok_lat, 99)),
        "mean_ms": _r(statistics.fmean(ok_lat) if ok_lat else None),
        "max_ms": _r(ok_lat[-1] if ok_lat else None),
    }
    # Medians of whatever per-request timings the side reports (embed, search, ...).
    keys = sorted({k for _, ok, d in records if ok for k, v in d.items() if isinstance(v, (int, float))})
    for key in keys:
        out[f"median_{key}"] = _r(_median([d[key] for _, ok, d in records if ok and key in d]))
    if errors:
        out["error_samples"] = [d.get("error") for d in errors[:MAX_ERROR_SAMPLES]]
    return out


def unique_texts(queries: list[str], start: int, n: int) -> list[str]:
    """Texts start..start+n of the endless sequence: every query, then every query + " (2)", ..."""
    out = []
    for i in range(start, start + n):
        rnd, j = divmod(i, len(queries))
        out.append(queries[j] if rnd == 0 else f"{queries[j]} ({rnd + 1})")
    return out


def plan_texts(
    queries: list[str], warmup: int, levels: list[int], per_level: int, rounds: int = 1
) -> list[dict[str, list[str]]]:
    """The texts each round's phases send; both sides get the same ones, and none repeats across
    phases or rounds (the service's cache never sees a text twice). Every round has the same warm-up."""
    plans = []
    start = warmup
    for _ in range(rounds):
        plan = {"warmup": unique_texts(queries, 0, warmup)}
        for c in levels:
            plan[str(c)] = unique_texts(queries, start, per_level)
            start += per_level
        plans.append(plan)
    return plans


# --- the baseline, in its own process ----------------------------------------------------------


def baseline_worker(spec_path: str) -> int:
    """Fresh process: one model, one MilvusClient, shared by every client thread; prints JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(spec_path).read_text())
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    started = time.perf_counter()
    import numpy as np
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from pymilvus import MilvusClient
    from sentence_transformers import SentenceTransformer

    from reembed.embedder import resolve_model
    from reembed.search import QueryCodec
    from reembed.store import MilvusStore, vector_payload

    uri, collection, k, ef = spec["uri"], spec["collection"], spec["k"], spec["ef"]
    store = MilvusStore(uri)
    try:
        identity = store.read_identity(collection)
    finally:
        store.close()
    if identity is None:
        raise SystemExit(f"collection {collection!r} has no reembed identity: was it made by the job?")
    codec = QueryCodec(identity)
    device = spec["device"]
    if device == "auto":  # as reembed.embedder.pick_device resolves it
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(resolve_model(identity.model["name"]).path, device=device)
    client = MilvusClient(uri=uri)
    client.load_collection(collection)
    rows = client.get_collection_stats(collection).get("row_count")
    ready_s = time.perf_counter() - started

    def search(text: str) -> tuple[list[str], float, float]:
        t0 = time.perf_counter()
        floats = model.encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).astype(
            np.float32
        )
        codes = codec.to_search_vectors(floats)  # int8 codes, the collection's calibration
        t1 = time.perf_counter()
        result = client.search(
            collection,
            data=vector_payload(codes, identity.vector_type),  # float32 rows for a FLOAT_VECTOR field
            anns_field="vector",
            limit=k,
            output_fields=OUTPUT_FIELDS,
            search_params={"metric_type": "IP", "params": {"ef": max(ef, k)}},
        )
        t2 = time.perf_counter()
        return [str(h["id"]) for h in result[0]], (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def make_worker() -> Worker:
        def work(text: str) -> tuple[bool, dict[str, Any]]:
            _, embed_ms, search_ms = search(text)
            return True, {"embed": embed_ms, "search": search_ms}

        return work

    plan = spec["texts"]
    top_ids = {text: search(text)[0] for text in plan["warmup"]}
    levels = []
    for c in spec["levels"]:
        level = run_level(make_worker, plan[str(c)], c, spec["max_seconds"])
        logger.info("baseline c=%d: %s qps, p50 %s ms, errors %d", c, level["qps"], level["p50_ms"], level["errors"])
        levels.append(level)
    print(
        json.dumps(
            {
                "device": device,
                "torch_threads": torch.get_num_threads(),
                "vector_type": identity.vector_type,
                "precision": identity.precision,
                "rows": int(rows) if rows is not None else None,
                "ready_s": round(ready_s, 3),
                "top_ids": top_ids,
                "levels": levels,
            }
        ),
        flush=True,
    )
    return 0


# --- subprocesses ------------------------------------------------------------------------------


def child_env(ray_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local Ray of our own: this measures this machine
    env["RAY_TMPDIR"] = str(ray_tmp)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, str, float]:
    """Run a command (stderr to log_path); returns (exit code, stdout, wall seconds).

    On timeout the child gets SIGTERM first (so the job can stop its Ray and Milvus Lite), then
    its whole process group gets SIGKILL.
    """
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.error("%s ran past %.0fs: stopping it; see %s", cmd[:3], timeout, log_path)
            proc.terminate()
            try:
                proc.communicate(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            raise RuntimeError(f"timed out after {timeout:.0f}s; log {log_path}:\n{_tail(log_path)}") from None
        return proc.returncode, stdout, time.monotonic() - started


def run_backfill(args: argparse.Namespace, uri: str, work: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "jobs.backfill",
        "--input",
        str(Path(args.corpus).resolve()),
        "--milvus-uri",
        uri,
        "--collection",
        args.collection,
        "--output-dir",
        str(work / "runs"),
        "--calibration-sample",
        str(args.calibration_sample),
        "--device",
        args.device,
    ]
    logger.info("backfill: %s", shlex.join(cmd))
    code, stdout, wall = run_child(cmd, env, work / "backfill.log", args.timeout)
    summary = _last_json_line(stdout)
    if code != 0 or summary is None or "error" in summary:
        log = work / "backfill.log"
        raise RuntimeError(f"backfill failed (exit {code}, summary {summary}); log {log}:\n{_tail(log)}")
    logger.info("backfill: %s documents written in %.1fs", summary.get("written"), wall)
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 3),
        "read": summary.get("read"),
        "written": summary.get("written"),
        "rejected_by_reason": summary.get("rejected_by_reason"),
        "vector_type": summary.get("vector_type"),
        "milvus": summary.get("milvus"),
        "seconds": summary.get("seconds"),
    }


def run_baseline(spec: dict[str, Any], work: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    spec_path = work / "baseline_spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / "baseline.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(spec_path)]
    logger.info("baseline: one process, one model and one MilvusClient shared by the client threads")
    code, stdout, wall = run_child(cmd, env, log_path, timeout)
    result = _last_json_line(stdout)
    if code != 0 or result is None:
        raise RuntimeError(f"baseline failed (exit {code}); log {log_path}:\n{_tail(log_path)}")
    result["wall_s"] = round(wall, 3)
    for level in result["levels"]:
        logger.info(
            "baseline c=%d: %s qps, p50 %s ms, errors %d",
            level["concurrency"],
            level["qps"],
            level["p50_ms"],
            level["errors"],
        )
    return result


# --- the service -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float) -> dict[str, Any]:
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.get(base + "/readyz", timeout=30)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:300]}"
        except requests.RequestException as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready after {timeout:.0f}s: {last}")


def _serve_log_tail(work: Path, n: int = 15) -> str:
    """The end of each Serve replica's log, for an error message (the files go with the work dir)."""
    logs = work / "rt" / "session_latest" / "logs" / "serve"
    parts = [f"--- {p}\n{_tail(p, n)}" for p in sorted(logs.glob("replica_*.log"))]
    return "\n".join(parts) or f"no replica logs under {logs}"


def http_search_worker(base: str, k: int, ef: int) -> Callable[[], Worker]:
    import requests

    def make_worker() -> Worker:
        session = requests.Session()

        def work(text: str) -> tuple[bool, dict[str, Any]]:
            t0 = time.perf_counter()
            r = session.post(base + "/search", json={"query": text, "k": k, "ef": ef}, timeout=REQUEST_TIMEOUT_S)
            client_ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                return False, {"error": f"{r.status_code} {r.text[:300]}"}
            body = r.json()
            t = body["timing_ms"]
            return True, {
                "embed": t["embed"],
                "search": t["search"],
                "total": t["total"],
                # HTTP proxy, routing to the ingress, (de)serialising, the client itself.
                "outside_service": client_ms - t["total"],
                "cache_hits": body["cache_hits"],
            }

        return work

    return make_worker


def healthz_worker(base: str) -> Callable[[], Worker]:
    import requests

    def make_worker() -> Worker:
        session = requests.Session()

        def work(_: str) -> tuple[bool, dict[str, Any]]:
            r = session.get(base + "/healthz", timeout=REQUEST_TIMEOUT_S)
            return (True, {}) if r.status_code == 200 else (False, {"error": f"{r.status_code} {r.text[:300]}"})

        return work

    return make_worker


def measure_service(
    args: argparse.Namespace,
    uri: str,
    work: Path,
    plan: dict[str, list[str]],
    levels: list[int],
    queries: list[str],
    extras: bool = True,
) -> dict[str, Any]:
    """Start Ray and the service, measure its levels on `plan`'s texts and, with `extras`, the cached
    phase and the floor; stop Serve and Ray."""
    import ray
    import requests
    from ray import serve

    from jobs.ray_init import init_ray
    from reembed.config import ServiceConfig
    from serve.app import build_app
    from serve.runtime import apply_serve_env

    overrides = {
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "cache_size": args.cache_size,
        "embed_in": args.embed_in,
    }
    cfg = ServiceConfig(
        milvus_uri=uri,
        collection=args.collection,
        device=args.device,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        embedder_num_cpus=args.embedder_num_cpus,
        embedder_threads=args.embedder_threads,
        ingress_num_cpus=args.ingress_num_cpus,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if cfg.cache_size < len(set(plan["warmup"]) | set(queries[: args.cache_set])):
        logger.warning("cache_size %d is smaller than the cached phase's queries: expect misses", cfg.cache_size)
    # Replicas are Ray workers started from this process's environment: they must find the repo's
    # packages and load the model offline.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("RAY_ADDRESS", None)
    serve_env = {} if args.ray_serve_defaults else apply_serve_env()
    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    # Replica logs (one access-log line a request) stay in files, not on this process's stderr:
    # forwarding them would spend the shared CPUs on the benchmark's own output.
    init_ray(
        None,
        num_cpus=cpus,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=str(work / "rt"),
        log_to_driver=False,
    )
    try:
        port = args.port or _free_port()
        base = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="reembed", route_prefix="/", blocking=False)
        try:
            ready = wait_ready(base, READY_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{_serve_log_tail(work)}") from None
        ready_s = time.perf_counter() - started
        logger.info("service ready on %s after %.1fs: %s", base, ready_s, ready.get("collection"))

        search_worker = http_search_worker(base, args.k, args.ef)
        session = requests.Session()

        def post(text: str) -> dict[str, Any]:
            r = session.post(base + "/search", json={"query": text, "k": args.k, "ef": args.ef}, timeout=60)
            r.raise_for_status()
            return r.json()

        def stats() -> dict[str, Any]:
            r = session.get(base + "/stats", timeout=30)
            r.raise_for_status()
            return r.json()["cache"]

        top_ids = {text: [h["id"] for h in post(text)["results"]] for text in plan["warmup"]}

        service_levels = []
        for c in levels:
            level = run_level(search_worker, plan[str(c)], c, args.max_seconds)
            logger.info("service c=%d: %s qps, p50 %s ms, errors %d", c, level["qps"], level["p50_ms"], level["errors"])
            service_levels.append(level)
        if not extras:
            return {"ready_s": round(ready_s, 3), "top_ids": top_ids, "levels": service_levels}

        # The cached phase: a few queries, each sent once to fill the cache, then only those.
        hot = queries[: args.cache_set]
        warm_hits = sum(post(text)["cache_hits"] for text in hot)
        cache_levels = []
        for c in levels:
            texts = [hot[i % len(hot)] for i in range(args.requests)]
            before = stats()
            level = run_level(search_worker, texts, c, args.max_seconds)
            after = stats()
            hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
            level["stats_hits"] = hits
            level["stats_misses"] = misses
            level["hit_ratio"] = _r(hits / (hits + misses) if hits + misses else None, 4)
            level["all_hits"] = misses == 0 and level.get("median_cache_hits") == 1 and hits == level["ok"]
            logger.info(
                "cache c=%d: %s qps, p50 %s ms, hit ratio %s, errors %d",
                c,
                level["qps"],
                level["p50_ms"],
                level["hit_ratio"],
                level["errors"],
            )
            cache_levels.append(level)

        floor = None
        if args.floor_requests > 0:
            healthz = healthz_worker(base)
            run_level(healthz, [""] * min(args.warmup, args.floor_requests), 1, args.max_seconds)
            floor = run_level(healthz, [""] * args.floor_requests, 1, args.max_seconds)
            floor["what"] = "GET /healthz at concurrency 1: HTTP proxy + ingress replica, no model, no Milvus"
            logger.info("serve floor: /healthz p50 %s ms", floor["p50_ms"])
        final_stats = stats()
        return {
            "config": cfg.model_dump(exclude={"api_key", "milvus_token"}),
            "serve_env": serve_env,
            "embedder_threads": cfg.embedder_torch_threads,
            "ready_s": round(ready_s, 3),
            "top_ids": top_ids,
            "levels": service_levels,
            "cache": {
                "queries": len(hot),
                "warm_pass_cache_hits": warm_hits,
                "levels": cache_levels,
                "stats_at_end": final_stats,
            },
            "floor": floor,
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# --- results -----------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _level(levels: list[dict[str, Any]], c: int) -> dict[str, Any] | None:
    return next((lv for lv in levels if lv["concurrency"] == c), None)


def median_levels(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per concurrency, the median over rounds of every number a level reports (counts summed)."""
    out = []
    for first in rounds[0]:
        c = first["concurrency"]
        same = [lv for levels in rounds if (lv := _level(levels, c))]
        merged: dict[str, Any] = {"concurrency": c, "rounds": len(same)}
        for key, value in first.items():
            if key == "concurrency" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            values = [lv[key] for lv in same if isinstance(lv.get(key), (int, float))]
            if key in ("requests", "ok", "errors"):
                merged[key] = sum(values)
            elif values:
                merged[key] = _r(statistics.median(values), 3)
        out.append(merged)
    return out


def compute_targets(rounds: list[tuple[list[dict], list[dict]]], errors_total: int) -> dict[str, Any]:
    """The targets from each round's baseline and service levels; the value is the median over rounds."""
    overheads, ratios = [], []
    for baseline, service in rounds:
        b1, s1 = _level(baseline, 1), _level(service, 1)
        if b1 and s1 and None not in (b1["p50_ms"], s1["p50_ms"]):
            overheads.append(s1["p50_ms"] - b1["p50_ms"])
        b16, s16 = _level(baseline, 16), _level(service, 16)
        if b16 and s16 and b16["qps"] and s16["qps"] is not None:
            ratios.append(s16["qps"] / b16["qps"])
    overhead = statistics.median(overheads) if overheads else None
    ratio = statistics.median(ratios) if ratios else None
    return {
        "service_p50_overhead_ms_at_1": {
            "value": _r(overhead),
            "per_round": [_r(x) for x in overheads],
            "target": f"<= {TARGET_OVERHEAD_MS}",
            "met": None if overhead is None else overhead <= TARGET_OVERHEAD_MS,
        },
        "qps_at_16_service_over_baseline": {
            "value": _r(ratio, 3),
            "per_round": [_r(x, 3) for x in ratios],
            "target": f"> {TARGET_QPS_RATIO}",
            "met": None if ratio is None else ratio > TARGET_QPS_RATIO,
        },
        "errors_total": {"value": errors_total, "target": "== 0", "met": errors_total == 0},
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if str(REPO_ROOT) not in sys.path:  # run as a file, the repo's packages must still import
        sys.path.insert(0, str(REPO_ROOT))
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit(f"--concurrency: expected positive integers like 1,4,16, got {args.concurrency!r}")
    queries = [
        json.loads(line)["text"] for line in Path(args.queries).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not queries:
        raise SystemExit(f"--queries: expected JSONL with a `text` field, got no queries from {args.queries}")
    plans = plan_texts(queries, args.warmup, levels, args.requests, args.rounds)
    uri = args.milvus_uri or str(work / "milvus.db")
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    env = child_env(work / "rt-children")
    (work / "rt-children").mkdir(exist_ok=True)
    loadavg_before = _loadavg()
    started = time.perf_counter()

    backfill = None
    if not args.skip_backfill:
        backfill = run_backfill(args, uri, work, env)

    rounds = []
    for r, plan in enumerate(plans):
        logger.info("round %d of %d", r + 1, len(plans))
        spec = {
            "uri": uri,
            "collection": args.collection,
            "k": args.k,
            "ef": args.ef,
            "device": args.device,
            "threads": args.baseline_threads,
            "levels": levels,
            "max_seconds": args.max_seconds,
            "texts": plan,
        }
        baseline = run_baseline(spec, work, env, args.timeout)
        service = measure_service(args, uri, work, plan, levels, queries, extras=r == len(plans) - 1)
        rounds.append({"baseline": baseline, "service": service["levels"]})
    baseline = rounds[0]["baseline"]

    agree = [rounds[-1]["baseline"]["top_ids"][t] == service["top_ids"][t] for t in plans[-1]["warmup"]]
    errors_total = sum(lv["errors"] for rd in rounds for lv in rd["baseline"]["levels"] + rd["service"]) + sum(
        lv["errors"] for lv in service["cache"]["levels"]
    )
    if service["floor"]:
        errors_total += service["floor"]["errors"]
    notes = [
        "one machine: the client threads, the service (Ray, proxy, ingress, embedder, Milvus Lite) and, "
        "in its turn, the baseline share its CPUs",
        f"{len(rounds)} round(s) of baseline then service, back to back: levels are the medians over rounds "
        "and targets the medians of the per-round comparisons (per_round)",
        f"the service's embedder runs {service['embedder_threads']} torch "
        f"thread(s); the baseline {baseline['torch_threads']}",
        "qps counts successful requests; latency percentiles are over successful requests, client side",
    ]
    if not all(agree):
        notes.append("the baseline and the service ranked some warm-up queries differently: see top_ids_agree")
    return {
        "benchmark": "serve_latency",
        "command": _command_line(),
        "corpus": str(Path(args.corpus).resolve()),
        "queries_file": str(Path(args.queries).resolve()),
        "queries": len(queries),
        "milvus_uri": uri,
        "collection": args.collection,
        "docs": {
            "read": (backfill or {}).get("read"),
            "written": (backfill or {}).get("written"),
            "in_collection": baseline.get("rows"),
        },
        "backfill": backfill,
        "k": args.k,
        "ef": args.ef,
        "requests_per_level": args.requests,
        "max_seconds_per_level": args.max_seconds,
        "warmup_requests": args.warmup,
        "baseline": {
            "call": "SentenceTransformer(path).encode([query], normalize_embeddings=True) -> "
            "QueryCodec(identity).to_search_vectors -> MilvusClient(uri).search(...), "
            "one model and one client shared by all client threads",
            "device": baseline["device"],
            "torch_threads": baseline["torch_threads"],
            "ready_s": baseline["ready_s"],
            "wall_s": baseline["wall_s"],
            "levels": median_levels([rd["baseline"]["levels"] for rd in rounds]),
            "rounds": [rd["baseline"]["levels"] for rd in rounds],
        },
        "service": {
            "config": service["config"],
            "serve_env": service["serve_env"],
            "ready_s": service["ready_s"],
            "what": "POST /search, every query new to the cache",
            "levels": median_levels([rd["service"] for rd in rounds]),
            "rounds": [rd["service"] for rd in rounds],
        },
        "cache": {"what": "POST /search, a few repeated queries answered from the cache", **service["cache"]},
        "serve_floor": service["floor"],
        "top_ids_agree": {"warmup_queries": len(agree), "same": sum(agree)},
        "rounds": len(rounds),
        "targets": compute_targets([(rd["baseline"]["levels"], rd["service"]) for rd in rounds], errors_total),
        "run_s": round(time.perf_counter() - started, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": loadavg_before,
            "loadavg_after": _loadavg(),
            "versions": {
                d: _version(d)
                for d in ("ray", "pymilvus", "milvus-lite", "sentence-transformers", "transformers", "torch", "fastapi")
            },
        },
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name, value in (
        ("--requests", args.requests),
        ("--warmup", args.warmup),
        ("--cache-set", args.cache_set),
        ("--rounds", args.rounds),
    ):
        if value < 1:
            raise SystemExit(f"{name}: expected at least 1, got {value}")
    if args.max_seconds <= 0:
        raise SystemExit(f"--max-seconds: expected a positive number, got {args.max_seconds}")
    keep = args.work_dir is not None
    # Short on purpose: Ray's session sockets live under it and Unix socket paths are short.
    work = Path(args.work_dir).resolve() if keep else Path(tempfile.mkdtemp(prefix="rserve-"))
    work.mkdir(parents=True, exist_ok=True)
    if len(str(work)) > 60:
        logger.warning("work dir %s is long: Ray's socket paths under it may exceed the Unix limit", work)
    try:
        result = measure(args, work)
    except RuntimeError as exc:  # a side failed or timed out: still one JSON line, saying so
        logger.error("%s", exc)
        print(json.dumps({"benchmark": "serve_latency", "command": _command_line(), "error": str(exc)}))
        return 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["work_dir"] = str(work) if keep else None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    t = result["targets"]
    logger.info(
        "p50 overhead at c=1: %s ms (met %s); qps ratio at c=16: %s (met %s); errors %s (met %s)",
        t["service_p50_overhead_ms_at_1"]["value"],
        t["service_p50_overhead_ms_at_1"]["met"],
        t["qps_at_16_service_over_baseline"]["value"],
        t["qps_at_16_service_over_baseline"]["met"],
        t["errors_total"]["value"],
        t["errors_total"]["met"],
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
