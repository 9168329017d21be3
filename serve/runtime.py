"""How Ray Serve itself should run for this service: its throughput-optimised mode.

Ray (>= 2.55) has a mode that skips work on every request: deployments call each other over gRPC
instead of through Ray's object store, user code and the request router run on the replica's own
event loop instead of a second thread, and replica logs are buffered instead of written line by line
to stderr. Serve reads these settings once, when its controller, proxies and replicas start, from
their environment: so they must be in the environment of whatever starts Ray (`ray start`, or the
`ray.init()` that starts a local Ray), not in the app's config.

Measured on 2 CPU cores (`benchmarks/serve_latency.py` against `--ray-serve-defaults`, see the
README): 5-6 ms less per request at one client; at 16 clients the same within the machine's noise.
The local launchers (`jobs.demo`, the benchmark, the tests) set it when they start Ray;
`ray_cluster.yaml` and the KubeRay RayService (cluster/rayservice-search.yaml) set it on every node.
Direct ingress (HTTP straight into the ingress replica, on ports 30000+) stays off where no
HAProxy sits in front: on KubeRay, Ray's HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`) takes port 8000 on
every pod and forwards to the replicas; elsewhere Serve's own proxy on every node keeps port 8000.
A value the user already exported wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Implied by the mode above; without HAProxy it would leave Serve's proxy on the head node only.
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
}


def apply_serve_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put SERVE_ENV into `environ` (default os.environ) where not set; returns what is in effect.

    Call it before the `ray.init()` that starts a local Ray: the raylet and every worker it starts
    inherit this process's environment. It does nothing for a Ray that is already running."""
    env = os.environ if environ is None else environ
    for key, value in SERVE_ENV.items():
        env.setdefault(key, value)
    return {key: env[key] for key in SERVE_ENV}
