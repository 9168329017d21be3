"""The search service's logic, free of Ray: validate a request, embed (cached), search, time it.

`serve/app.py` wraps this in a FastAPI ingress deployment and hands it an `embed` coroutine that
calls the batched query-embedding deployment; unit tests hand it a local one. Milvus is reached
through `reembed.store.MilvusStore` on a thread pool (pymilvus is synchronous), with one thread
for an in-process Milvus Lite .db. The collection (or alias) is re-described every
`identity_refresh_s`, so an alias switch to a collection with another model is followed without
a restart, and a Milvus that went away is reconnected on the next request.

Concurrent requests with the same search parameters reach Milvus as one search with several query
vectors (`serve.coalesce.Coalescer`, one per parameter set): one RPC instead of one per request.
A collection that keeps re-rank copies (binary or int8 codes + float16 copies) is searched in two
stages (`reembed.search.search_reranked`), as `jobs.evaluate` measured it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from reembed.cache import EmbeddingCache, normalize_query
from reembed.config import ServiceConfig
from reembed.errors import ModelMismatchError, ReembedError, StoreUnavailableError
from reembed.filters import Clause, FilterError, compile_filter
from reembed.lite import is_lite_uri
from reembed.search import Hit, QueryCodec, model_key, search_queries
from reembed.store import F_ID, F_RERANK, F_VECTOR, MilvusStore
from serve.coalesce import Coalescer
from serve.models import SearchHit, SearchRequest, SearchResponse, Timing

logger = logging.getLogger(__name__)

EmbedFn = Callable[[dict[str, Any], list[str]], Awaitable[list[np.ndarray]]]
CheckFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MILVUS_SERVER_THREADS = 16
# Merged searches in flight per parameter set: one for an in-process Milvus Lite (one thread uses
# it), a few against a server, so that a slow search does not hold up the next merge.
MILVUS_SERVER_SEARCHES = 4
# Parameter sets (k, ef, filter, ...) whose search queues are kept; the least recently used go.
SEARCH_QUEUES = 256
# A target older than this many refresh intervals is re-read before a request uses it.
IDLE_REFRESH_FACTOR = 5


class RequestError(Exception):
    """Ends a request with an HTTP status and a JSON error body naming the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


def bad_request(field: str, message: str) -> RequestError:
    return RequestError(400, "invalid_request", f"{field}: {message}", field)


@dataclass(frozen=True)
class Target:
    """What `collection` (a name or an alias) points at right now."""

    collection: str
    model: dict[str, Any]
    model_key: str
    codec: QueryCodec  # with the identity: vector type, int8 calibration, re-rank copies
    identity_json: str  # the whole identity: what a search queue's calls were built for
    partitions: frozenset[str]
    scalar_fields: dict[str, str]
    resolved_at: float


class NoMetrics:
    """The metrics interface with nothing behind it (unit tests, no Ray)."""

    def request(self, route: str, status: int) -> None: ...
    def latency(self, embed_ms: float, search_ms: float, total_ms: float) -> None: ...
    def cache(self, hits: int, misses: int, ratio: float) -> None: ...
    def search_batch(self, queries: int) -> None: ...


class SearchService:
    def __init__(self, cfg: ServiceConfig, embed: EmbedFn, check_model: CheckFn, metrics: Any = None) -> None:
        self.cfg = cfg
        self.uri = str(Path(cfg.milvus_uri).expanduser().resolve()) if is_lite_uri(cfg.milvus_uri) else cfg.milvus_uri
        self._embed = embed
        self._check_model = check_model
        self.metrics = metrics or NoMetrics()
        self.cache = EmbeddingCache(cfg.cache_size)
        lite = is_lite_uri(cfg.milvus_uri)
        self._executor = ThreadPoolExecutor(
            max_workers=1 if lite else MILVUS_SERVER_THREADS, thread_name_prefix="milvus"
        )
        self._searches_per_queue = 1 if lite else MILVUS_SERVER_SEARCHES
        self._search_queues: OrderedDict[tuple[Any, ...], Coalescer[np.ndarray]] = OrderedDict()
        self.search_calls = 0  # Milvus searches made
        self.search_queries = 0  # query vectors they carried
        self._store: MilvusStore | None = None
        self._target: Target | None = None
        self._refresh_lock = asyncio.Lock()
        self._refresh_task: asyncio.Future | None = None
        self._checked_models: set[str] = set()

    # --- Milvus, off the event loop ------------------------------------------------------------

    def _with_store(self, fn: Callable[[MilvusStore], Any]) -> Any:
        """fn(store), connecting first if needed; runs on the Milvus thread pool."""
        if self._store is None:
            self._store = MilvusStore(self.uri, self.cfg.milvus_token, timeout=self.cfg.search_timeout_s, retries=0)
        return fn(self._store)

    async def _milvus(self, fn: Callable[[MilvusStore], Any]) -> Any:
        """Run fn(store) on the Milvus thread pool; a failure to reach Milvus drops the connection
        so that the next call reconnects (the service recovers when Milvus is back)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._with_store, fn)
        except StoreUnavailableError:
            self._drop_store()
            raise

    def _drop_store(self) -> None:
        store, self._store = self._store, None
        self._target = None
        if store is not None:
            self._executor.submit(store.close)

    def _resolve(self, store: MilvusStore) -> Target:
        if not store.has_collection(self.cfg.collection):
            raise RequestError(
                503, "collection_not_found", f"collection or alias {self.cfg.collection!r} does not exist"
            )
        info = store.describe(self.cfg.collection)
        if info.identity is None:
            raise RequestError(
                503,
                "not_a_reembed_collection",
                f"collection {info.name!r} has no reembed identity: was it made by the job?",
            )
        store.load(info.name)
        return Target(
            collection=info.name,
            model=info.identity.model,
            model_key=model_key(info.identity.model),
            codec=QueryCodec(info.identity),
            identity_json=info.identity.to_json(),
            partitions=frozenset(store.list_partitions(info.name)),
            scalar_fields={k: v for k, v in info.scalar_fields.items() if k not in (F_VECTOR, F_RERANK)},
            resolved_at=time.monotonic(),
        )

    async def target(self, force: bool = False) -> Target:
        """The collection and model to serve this request with: one pair, used for the whole request.

        Once there is a target, a stale one is re-read in the background while requests go on with
        it; the new pair replaces it only after its model is loaded in the embedder, so no request
        waits on a model load and none mixes one pair's model with the other's collection."""
        current = self._target
        if current and not force:
            age = time.monotonic() - current.resolved_at
            if age < self.cfg.identity_refresh_s:
                return current
            if age < IDLE_REFRESH_FACTOR * self.cfg.identity_refresh_s:
                self._refresh_in_background()
                return current
            # After an idle spell the pair may be several switches old (its collection even dropped
            # since): the first request re-reads it before answering.
        return await self._refresh(force)

    def _refresh_in_background(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh(force=False)
        except Exception as exc:  # keep serving the pair we have; requests report Milvus trouble themselves
            current = self._target
            if current is not None:
                self._target = replace(current, resolved_at=time.monotonic())  # try again after the interval
            serving = current.collection if current else None
            logger.warning("re-reading %r failed, serving %r meanwhile: %s", self.cfg.collection, serving, exc)

    async def _refresh(self, force: bool) -> Target:
        async with self._refresh_lock:
            current = self._target
            if current and not force and time.monotonic() - current.resolved_at < self.cfg.identity_refresh_s:
                return current
            new = await self._milvus(self._resolve)
            if current is None or new.model_key != current.model_key or new.model_key not in self._checked_models:
                await self._check(new)  # the embedder loads the model before any request uses the new pair
            if current and current.collection != new.collection:
                logger.info("%r now points at %r (model %s)", self.cfg.collection, new.collection, new.model_key)
            self._target = new
            return new

    async def _check(self, target: Target) -> dict[str, Any]:
        try:
            info = await self._check_model(target.model)
        except ReembedError as exc:
            raise RequestError(
                503, "model_mismatch" if isinstance(exc, ModelMismatchError) else "model_unavailable", str(exc)
            ) from exc
        self._checked_models.add(target.model_key)
        return info

    # --- endpoints -----------------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Milvus reachable, collection loaded, model loaded and matching. Raises RequestError(503)."""
        try:
            target = await self.target(force=True)
            model = await self._check(target)
        except StoreUnavailableError as exc:
            raise RequestError(503, "milvus_unavailable", str(exc)) from exc
        return {"status": "ready", "collection": target.collection, "alias": self.cfg.collection, "model": model}

    def stats(self) -> dict[str, Any]:
        s = self.cache.stats()
        target = self._target
        return {
            "cache": {
                "hits": s.hits,
                "misses": s.misses,
                "size": s.size,
                "capacity": s.capacity,
                "hit_ratio": s.hit_ratio,
            },
            "searches": {"milvus_calls": self.search_calls, "queries": self.search_queries},
            "collection": target.collection if target else None,
            "model": target.model_key if target else None,
        }

    def validate(
        self, req: SearchRequest, target: Target
    ) -> tuple[list[str], int, int, str, list[str] | None, list[str]]:
        cfg = self.cfg
        texts = req.texts()
        form = "query" if req.query is not None else "queries"
        if not texts:
            raise bad_request("queries", "expected at least one query, got an empty list")
        if len(texts) > cfg.max_batch_queries:
            raise bad_request("queries", f"expected at most {cfg.max_batch_queries} queries, got {len(texts)}")
        normalized = []
        for i, text in enumerate(texts):
            where = form if form == "query" else f"queries[{i}]"
            clean = normalize_query(text)
            if not clean:
                raise bad_request(
                    where, "expected a non-empty query, got only whitespace" if text else "expected a non-empty query"
                )
            if len(text) > cfg.max_query_chars:
                raise bad_request(where, f"expected at most {cfg.max_query_chars} characters, got {len(text)}")
            normalized.append(clean)
        k = cfg.default_k if req.k is None else req.k
        if not 1 <= k <= cfg.max_k:
            raise bad_request("k", f"expected 1..{cfg.max_k}, got {k}")
        ef = cfg.default_ef if req.ef is None else req.ef
        if not 1 <= ef <= cfg.max_ef:
            raise bad_request("ef", f"expected 1..{cfg.max_ef}, got {ef}")
        partitions = None
        if req.partitions is not None:
            if not req.partitions:
                raise bad_request("partitions", "expected at least one partition name, got an empty list")
            for i, name in enumerate(req.partitions):
                if name not in target.partitions:
                    raise bad_request(
                        f"partitions[{i}]", f"unknown partition {name!r} in collection {target.collection!r}"
                    )
            partitions = list(dict.fromkeys(req.partitions))
        try:
            expr = compile_filter([Clause(c.field, c.op, c.value) for c in req.clauses()], target.scalar_fields)
        except FilterError as exc:
            raise bad_request(exc.field, str(exc).split(": ", 1)[1]) from exc
        fields = list(self.cfg.output_fields if req.fields is None else req.fields)
        for i, name in enumerate(fields):
            if name not in target.scalar_fields:
                raise bad_request(
                    f"fields[{i}]", f"unknown field {name!r}; stored fields: {sorted(target.scalar_fields)}"
                )
        return normalized, k, ef, expr, partitions, [f for f in fields if f != F_ID]

    async def _vectors(self, target: Target, texts: list[str]) -> tuple[np.ndarray, int]:
        """Float query embeddings from the cache or the embedder; returns (vectors, cache hits)."""
        found: dict[int, np.ndarray] = {}
        missing: list[int] = []
        for i, text in enumerate(texts):
            vec = self.cache.get(target.model_key, text)
            if vec is None:
                missing.append(i)
            else:
                found[i] = vec
        if missing:
            new = await self._embed(target.model, [texts[i] for i in missing])
            for i, vec in zip(missing, new, strict=True):
                self.cache.put(target.model_key, texts[i], vec)
                found[i] = vec
        s = self.cache.stats()
        self.metrics.cache(len(texts) - len(missing), len(missing), s.hit_ratio)
        return np.stack([found[i] for i in range(len(texts))]).astype(np.float32), len(texts) - len(missing)

    def _search_queue(
        self, target: Target, k: int, ef: int, partitions: list[str] | None, expr: str, fields: list[str]
    ) -> Coalescer[np.ndarray]:
        """The queue that merges concurrent searches with these parameters into one Milvus search.

        Its items are float query embeddings; a call turns them into the collection's codes, searches
        (two stages where the collection keeps re-rank copies) and scores the hits as cosines."""
        key = (target.collection, target.identity_json, k, ef, tuple(partitions or ()), expr, tuple(fields))
        queue = self._search_queues.get(key)
        if queue is not None:
            self._search_queues.move_to_end(key)
            return queue
        out_fields, multiplier = tuple(fields), self.cfg.rescore_multiplier

        def once(store: MilvusStore, floats: np.ndarray) -> list[list[Hit]]:
            return search_queries(
                store, target.collection, target.codec, floats, k, ef, multiplier, partitions, expr, out_fields
            )

        def search(store: MilvusStore, floats: np.ndarray) -> list[list[Hit]]:
            try:
                return once(store, floats)
            except ReembedError as exc:
                if "not loaded" not in str(exc):
                    raise
                store._loaded.discard(target.collection)  # e.g. after a Milvus restart: load again
                store.load(target.collection)
                return once(store, floats)

        def run(queries: list[np.ndarray]) -> list[list[Hit]]:
            floats = np.stack(queries).astype(np.float32, copy=False)
            return self._with_store(lambda store: search(store, floats))

        queue = Coalescer(
            run,
            self.cfg.max_batch_queries,
            self._record_search,
            max_concurrent=self._searches_per_queue,
            executor=self._executor,
        )
        self._search_queues[key] = queue
        while len(self._search_queues) > SEARCH_QUEUES:
            self._search_queues.popitem(last=False)  # a queue still at work finishes what it holds
        return queue

    def _record_search(self, queries: int, seconds: float) -> None:
        self.search_calls += 1
        self.search_queries += queries
        self.metrics.search_batch(queries)

    async def search(self, req: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        try:
            target = await self.target()
        except StoreUnavailableError as exc:
            raise RequestError(503, "milvus_unavailable", str(exc)) from exc
        texts, k, ef, expr, partitions, fields = self.validate(req, target)
        t_embed = time.perf_counter()
        floats, hits = await self._vectors(target, texts)
        t_search = time.perf_counter()
        try:
            rows = await self._search_queue(target, k, ef, partitions, expr, fields)(list(floats))
        except StoreUnavailableError as exc:
            self._drop_store()
            raise RequestError(503, "milvus_unavailable", str(exc)) from exc
        except ReembedError as exc:
            if exc.is_input_error:
                raise RequestError(400, "invalid_request", str(exc)) from exc
            raise
        t_end = time.perf_counter()
        results = [[SearchHit(id=h.id, score=h.score, fields=h.fields) for h in row] for row in rows]
        timing = Timing(embed=(t_search - t_embed) * 1e3, search=(t_end - t_search) * 1e3, total=(t_end - t0) * 1e3)
        self.metrics.latency(timing.embed, timing.search, timing.total)
        return SearchResponse(
            results=results[0] if req.query is not None else results,
            model=target.model["name"],
            model_key=target.model_key,
            collection=target.collection,
            k=k,
            cache_hits=hits,
            timing_ms=timing,
        )

    def close(self) -> None:
        self._drop_store()
        self._executor.shutdown(wait=False)
