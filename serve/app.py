"""Ray Serve app: `serve run serve.app:build_app milvus_uri=URI collection=NAME`.

HTTP -> SearchIngress (FastAPI; validation, cache, Milvus search, timings) -> QueryEmbedder
(autoscaled, `@serve.batch`, one GPU per replica where the cluster has GPUs) -> back. With
`embed_in: ingress` there is no QueryEmbedder: each ingress replica holds the models itself
(`QueryModels`, the same class the QueryEmbedder uses) and autoscales as the embedder would, which
saves a call between replicas per query (measured on 2 CPU cores: 11.5 -> 4.2 ms over plain encode +
search at one client; see the README). Both are thin adapters: the logic is in serve/service.py,
serve/coalesce.py and reembed/. `build_app` takes a typed config, so
`serve run`, `serve deploy serve/config.yaml` and Python all validate the same arguments.

No `from __future__ import annotations` here: FastAPI reads the route signatures' types at
runtime through Serve's wrapper, and string annotations would turn `Request` into a query field.
"""

import asyncio
import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from reembed.config import ServiceConfig
from reembed.embedder import Embedder, pick_device
from reembed.lite import is_lite_uri
from reembed.search import load_query_model, model_key
from serve.coalesce import Coalescer
from serve.models import SearchRequest
from serve.service import RequestError, SearchService

logger = logging.getLogger(__name__)

# Models kept loaded per embedder replica: the current one and, during a migration, the next.
MODELS_PER_REPLICA = 2
# Batches @serve.batch lets through at once; serve.coalesce merges those that wait for the model.
MAX_CONCURRENT_BATCHES = 8
# Requests an embedder replica takes at once: at least max_batch_size x MAX_CONCURRENT_BATCHES.
EMBEDDER_MAX_ONGOING = 256


class QueryModels:
    """The query models one process keeps loaded: the current one and, during a migration, the next.

    Each model runs in a worker thread, one call at a time, behind a `Coalescer`: queries that arrive
    while it runs are merged into its next call. The QueryEmbedder deployment holds one; so does the
    ingress itself with `embed_in: ingress`. Free of Ray."""

    def __init__(self, cfg: ServiceConfig, on_call: Callable[[int, float], None] | None = None) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.threads = cfg.embedder_torch_threads
        self._on_call = on_call
        self._models: OrderedDict[str, tuple[Embedder, Coalescer[str]]] = OrderedDict()
        self._load_lock = asyncio.Lock()

    async def model(self, model: dict[str, Any]) -> tuple[Embedder, Coalescer[str]]:
        key = model_key(model)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        async with self._load_lock:
            if key not in self._models:
                embedder = await asyncio.to_thread(
                    load_query_model, model, self.device, None, self.cfg.max_batch_size, self.threads
                )
                queue = Coalescer(embedder.encode_queries, self.cfg.max_batch_size, self._on_call)
                self._models[key] = (embedder, queue)
                while len(self._models) > MODELS_PER_REPLICA:
                    self._models.popitem(last=False)
                logger.info("loaded %s on %s", key, self.device)
        return self._models[key]

    async def check(self, model: dict[str, Any]) -> dict[str, Any]:
        """Load (or find) the model and prove it matches the collection's; raises ModelMismatchError."""
        embedder, _ = await self.model(model)
        return {"model": model_key(model), "device": embedder.device, "dimension": embedder.dimension}

    def stats(self) -> dict[str, dict[str, int]]:
        """Model calls and the queries they covered, per loaded model."""
        return {key: {"model_calls": q.calls, "queries": q.items} for key, (_, q) in self._models.items()}

    async def embed(self, model: dict[str, Any], texts: list[str]) -> list[np.ndarray]:
        """Texts for one model: one call, merged with the other calls waiting for that model."""
        _, queue = await self.model(model)
        return await queue(texts)

    async def embed_many(self, models: list[dict[str, Any]], texts: list[str]) -> list[np.ndarray]:
        """Texts for several models (two during a migration): one call per model, concurrently."""
        out: list[np.ndarray | None] = [None] * len(texts)
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(models):
            groups.setdefault(model_key(m), []).append(i)

        async def run(idx: list[int]) -> None:
            vectors = await self.embed(models[idx[0]], [texts[i] for i in idx])
            for i, vec in zip(idx, vectors, strict=True):
                out[i] = vec

        await asyncio.gather(*(run(idx) for idx in groups.values()))
        return out  # type: ignore[return-value]


def _batch_recorder() -> Callable[[int, float], None] | None:
    """Reports each model call's size and duration to Ray's metrics; None outside Ray (unit tests)."""
    try:
        from serve.metrics import EmbedderMetrics

        metrics = EmbedderMetrics()
    except Exception:  # outside Ray there is nowhere to report to
        logger.debug("no Ray metrics", exc_info=True)
        return None
    return lambda n, seconds: metrics.batch(n, seconds * 1e3)


@serve.deployment(max_ongoing_requests=EMBEDDER_MAX_ONGOING)
class QueryEmbedder:
    """Float query embeddings, batched across concurrent requests; loads the model a collection names."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServiceConfig(**config)
        self._embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.models = QueryModels(self.cfg, _batch_recorder())

    async def check(self, model: dict[str, Any]) -> dict[str, Any]:
        return await self.models.check(model)

    def stats(self) -> dict[str, dict[str, int]]:
        return self.models.stats()

    async def embed(self, model: dict[str, Any], text: str) -> np.ndarray:
        return await self._embed_batch(model, text)

    # Ray forms a batch as soon as it hands off the previous one, so behind a running batch they stay
    # small; MAX_CONCURRENT_BATCHES of them reach the models at once and their Coalescers merge them.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _embed_batch(self, models: list[dict[str, Any]], texts: list[str]) -> list[np.ndarray]:
        return await self.models.embed_many(models, texts)


api = FastAPI(title="reembed search", version="1")


def _field_of(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "int", "float", "list[...]", "FilterClause") or "[" in str(p):
            continue  # union branch names that pydantic puts in the location
        else:
            out += f".{p}" if out else str(p)
    return out or None


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = _field_of(tuple(err.get("loc", ())))
    msg = err.get("msg", "invalid request")
    if err.get("type") == "json_invalid":
        field, msg = None, f"body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
    elif err.get("type") == "missing" and field is None:
        msg = "expected a JSON object body"
    elif err.get("type") == "value_error" and field is None:
        field, msg = "query", msg.removeprefix("Value error, ")
    message = f"{field}: {msg}" if field else msg
    return JSONResponse(
        status_code=400, content={"error": {"code": "invalid_request", "message": message, "field": field}}
    )


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body())


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class SearchIngress:
    def __init__(self, config: dict[str, Any], embedder: DeploymentHandle | None) -> None:
        """`embedder`: the QueryEmbedder deployment, or None to embed here (`embed_in: ingress`)."""
        self.cfg = ServiceConfig(**config)
        self.embedder = embedder
        self.models = QueryModels(self.cfg, _batch_recorder()) if embedder is None else None
        metrics = None
        try:
            from serve.metrics import ServiceMetrics

            metrics = ServiceMetrics()
        except Exception:
            logger.debug("no Ray metrics", exc_info=True)
        self.service = SearchService(self.cfg, self._embed, self._check_model, metrics)

    async def _embed(self, model: dict[str, Any], texts: list[str]) -> list[np.ndarray]:
        if self.models is not None:  # one call, merged with the other requests waiting for the model
            return await self.models.embed(model, texts)
        # One call per query: the embedder's @serve.batch merges them with other requests' queries.
        return list(await asyncio.gather(*[self.embedder.embed.remote(model, t) for t in texts]))

    async def _check_model(self, model: dict[str, Any]) -> dict[str, Any]:
        if self.models is not None:
            return await self.models.check(model)
        return await self.embedder.check.remote(model)

    def _authorize(self, request: Request) -> None:
        if not self.cfg.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            raise RequestError(401, "unauthorized", "Authorization: expected `Bearer <api key>`", "Authorization")

    @api.post("/search")
    async def search(self, body: SearchRequest, request: Request) -> JSONResponse:
        status = 200
        try:
            self._authorize(request)
            response = await self.service.search(body)
            return JSONResponse(response.model_dump())
        except RequestError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            logger.exception("search failed")
            raise RequestError(500, "internal", "internal error; see the service log") from None
        finally:
            self.service.metrics.request("/search", status)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            return JSONResponse(await self.service.ready())
        except RequestError as exc:
            return JSONResponse(status_code=503, content={"status": "not ready", **exc.body()})

    @api.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        stats = self.service.stats()
        if self.models is not None:
            stats["embedder"] = self.models.stats()  # model calls of this replica's models
        return stats

    async def check_health(self) -> None:
        """Serve's replica health check: alive is enough; readiness (Milvus, model) is /readyz."""


def _embedder_gpus(cfg: ServiceConfig) -> float:
    if cfg.embedder_num_gpus is not None:
        return cfg.embedder_num_gpus
    if cfg.device == "cpu":
        return 0.0
    if cfg.device == "cuda":
        return 1.0
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(args: ServiceConfig) -> Application:
    """The typed app builder: `serve run serve.app:build_app milvus_uri=... collection=...`."""
    cfg = args if isinstance(args, ServiceConfig) else ServiceConfig(**args)
    config = cfg.model_dump()
    if is_lite_uri(cfg.milvus_uri):
        # Replicas do not share the caller's working directory: pin a relative .db path here.
        config["milvus_uri"] = str(Path(cfg.milvus_uri).expanduser().resolve())
    gpus = _embedder_gpus(cfg)
    embedder_cpus = 1.0 if gpus else cfg.embedder_num_cpus
    autoscaling = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
    }
    if cfg.embed_in == "ingress":
        # One deployment: each ingress replica embeds its own queries, and scales as the embedder would.
        replicas: dict[str, Any] = {"autoscaling_config": autoscaling}
        if is_lite_uri(cfg.milvus_uri):  # one process opens the .db (checked in ServiceConfig)
            replicas = {"num_replicas": 1}
        return SearchIngress.options(
            **replicas, ray_actor_options={"num_cpus": cfg.ingress_num_cpus + embedder_cpus, "num_gpus": gpus}
        ).bind(config, None)
    embedder = QueryEmbedder.options(
        max_ongoing_requests=max(EMBEDDER_MAX_ONGOING, cfg.max_batch_size * MAX_CONCURRENT_BATCHES),
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": embedder_cpus, "num_gpus": gpus},
    ).bind(config)
    return SearchIngress.options(
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_num_cpus}
    ).bind(config, embedder)
