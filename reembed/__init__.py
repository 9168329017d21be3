"""reembed: the core library shared by the backfill job (jobs/) and the search service (serve/).

Nothing here imports ray.data or ray.serve, and nothing heavy happens at import time.
"""

__version__ = "0.1.0"
