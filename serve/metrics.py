"""Prometheus metrics of the search service, through Ray's metrics (they show in the Ray dashboard
and on each node's metrics export port). Built inside replicas only, where Ray is initialised."""

from __future__ import annotations

LATENCY_MS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServiceMetrics:
    """Requests by route and status; embed/search/total latency histograms; cache hits, misses, ratio;
    query vectors per Milvus search."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._requests = metrics.Counter(
            "reembed_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self._embed = metrics.Histogram(
            "reembed_embed_ms", description="query embedding time per request (ms)", boundaries=LATENCY_MS_BOUNDARIES
        )
        self._search = metrics.Histogram(
            "reembed_search_ms", description="Milvus search time per request (ms)", boundaries=LATENCY_MS_BOUNDARIES
        )
        self._total = metrics.Histogram(
            "reembed_request_ms", description="search request time (ms)", boundaries=LATENCY_MS_BOUNDARIES
        )
        self._hits = metrics.Counter("reembed_cache_hits", description="query embeddings served from the cache")
        self._misses = metrics.Counter("reembed_cache_misses", description="query embeddings computed")
        self._ratio = metrics.Gauge("reembed_cache_hit_ratio", description="cache hits / lookups since start")
        self._search_batch = metrics.Histogram(
            "reembed_search_batch_size",
            description="query vectors per Milvus search (concurrent requests merged)",
            boundaries=BATCH_BOUNDARIES,
        )

    def request(self, route: str, status: int) -> None:
        self._requests.inc(1, tags={"route": route, "status": str(status)})

    def latency(self, embed_ms: float, search_ms: float, total_ms: float) -> None:
        self._embed.observe(embed_ms)
        self._search.observe(search_ms)
        self._total.observe(total_ms)

    def cache(self, hits: int, misses: int, ratio: float) -> None:
        if hits:
            self._hits.inc(hits)
        if misses:
            self._misses.inc(misses)
        self._ratio.set(ratio)

    def search_batch(self, queries: int) -> None:
        self._search_batch.observe(queries)


class EmbedderMetrics:
    def __init__(self) -> None:
        from ray.util import metrics

        self._batch = metrics.Histogram(
            "reembed_embed_batch_size", description="queries per model call", boundaries=BATCH_BOUNDARIES
        )
        self._model_ms = metrics.Histogram(
            "reembed_embed_batch_ms", description="model time per batch (ms)", boundaries=LATENCY_MS_BOUNDARIES
        )

    def batch(self, size: int, ms: float) -> None:
        self._batch.observe(size)
        self._model_ms.observe(ms)
