"""Starting or joining Ray, for the jobs that do (backfill, demo).

A local Ray's start-up fails now and then on a loaded machine: its GCS misses the deadline for
writing its port file ("Timed out waiting for file .../gcs_server_port_..."), seen here on 2 cores
for the backfill and for the demo. A second start then works, so a local start is tried twice.
Joining a cluster (an address) is tried once: its failure is the cluster's, not a race.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def init_ray(address: str | None, **kwargs: Any) -> None:
    """`ray.init(address=address, **kwargs)`; a local start (no address) that fails is tried once more."""
    import ray

    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:
        if address:
            raise
        logger.warning("starting a local Ray failed (%s); trying once more", exc)
        ray.shutdown()
        ray.init(**kwargs)
