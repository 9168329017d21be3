"""The search service for real: Ray Serve on the local Ray, HTTP, Milvus Lite (as a server the
test can stop and restart), the MiniLM model, a collection made by the backfill job."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import requests

from jobs.backfill import parse_config, run
from reembed.config import ServiceConfig
from reembed.embedder import describe_model
from reembed.lite import LiteServer
from reembed.search import Searcher
from reembed.store import MilvusStore
from tests.conftest import cranfield_docs, read_jsonl, write_jsonl

pytestmark = pytest.mark.integration

API_KEY = "s3cret-key"
QUERY = "the boundary layer in simple shear flow past a flat plate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float = 120.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = requests.get(url, timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                return r
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    server = LiteServer(str(tmp_path_factory.mktemp("serve") / "serve.db"))
    server.__enter__()
    yield server
    server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def service(tmp_path_factory, cranfield, ray_local, lite):
    from ray import serve

    from serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve-data")
    docs = cranfield_docs(cranfield, 300)
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    summary = run(
        parse_config(
            [
                "--input",
                str(corpus),
                "--milvus-uri",
                lite.uri,
                "--collection",
                "docs",
                "--partitions",
                "2",
                "--calibration-sample",
                "128",
                "--output-dir",
                str(tmp / "runs"),
            ]
        )
    )
    assert summary["written"] == 300

    # A collection that claims MiniLM but with other weights: the service must refuse it.
    store = MilvusStore(lite.uri)
    _, model = describe_model("sentence-transformers/all-MiniLM-L6-v2")
    good = store.read_identity("docs")
    bad_model = {**model.to_dict(), "weights_sha256": "0" * 64}
    store.create_collection("bad_model", replace(good, model=bad_model), 1024)
    store.client.create_alias("docs", "docs_live")  # the secured app searches through an alias
    store.close()

    port = _free_port()
    serve.shutdown()  # a Serve left by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {
        "milvus_uri": lite.uri,
        "min_replicas": 1,
        "max_replicas": 1,
        "embedder_num_cpus": 0.25,
        "ingress_num_cpus": 0.25,
        "identity_refresh_s": 1.0,
        "search_timeout_s": 3.0,
    }
    serve.run(build_app(ServiceConfig(collection="docs", **common)), name="main", route_prefix="/", blocking=False)
    # The secured app embeds its queries in its ingress replica (embed_in=ingress), no embedder deployment.
    serve.run(
        build_app(ServiceConfig(collection="docs_live", api_key=API_KEY, embed_in="ingress", **common)),
        name="secure",
        route_prefix="/secure",
        blocking=False,
    )
    serve.run(
        build_app(ServiceConfig(collection="bad_model", **common)), name="bad", route_prefix="/bad", blocking=False
    )
    base = f"http://127.0.0.1:{port}"
    ready = _wait_ready(base + "/readyz")
    assert ready.status_code == 200, ready.text
    yield {"base": base, "lite": lite, "docs": {d["_id"]: d for d in docs}}
    serve.shutdown()


def post(service, body, path="/search", **kw):
    return requests.post(service["base"] + path, json=body, timeout=60, **kw)


def error_of(response, status=400):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["message"]
    return body


def test_search_returns_the_right_document_with_timings(service, lite):
    r = post(service, {"query": QUERY, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["id"] == "3"
    assert body["collection"] == "docs" and body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(body["results"]) == 5
    assert 0.5 < body["results"][0]["score"] <= 1.01  # a cosine, not a raw int8 inner product
    assert body["results"][0]["fields"]["text"].startswith("the boundary layer")
    t = body["timing_ms"]
    assert t["embed"] > 0 and t["search"] > 0 and t["total"] >= t["embed"] + t["search"]
    # The same ranking as the library's in-process Searcher on the same collection.
    store = MilvusStore(lite.uri)
    try:
        hits, _ = Searcher(store, "docs", device="cpu").search([QUERY], k=5)
    finally:
        store.close()
    assert [h["id"] for h in body["results"]] == [h.id for h in hits[0]]


def test_batch_form_partitions_filters_and_fields(service):
    r = post(service, {"queries": [QUERY, "heat transfer in hypersonic flow"], "k": 3, "fields": ["partition"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(len(row) == 3 for row in results)
    assert set(results[0][0]["fields"]) == {"partition"}

    r = post(service, {"query": QUERY, "k": 10, "partitions": ["part_0000"]})
    assert r.status_code == 200, r.text
    assert {h["fields"]["partition"] for h in r.json()["results"]} == {"part_0000"}

    wanted = ["10", "20", "30"]
    r = post(service, {"query": QUERY, "k": 10, "filter": [{"field": "id", "op": "in", "value": wanted}]})
    assert r.status_code == 200, r.text
    # HNSW under a very selective filter may miss some (approximate); it never returns others.
    found = {h["id"] for h in r.json()["results"]}
    assert found and found <= set(wanted)
    r = post(service, {"query": QUERY, "k": 10, "filter": [{"field": "id", "op": "not_in", "value": ["3"]}]})
    assert r.status_code == 200 and "3" not in {h["id"] for h in r.json()["results"]}

    # A value with quotes and backslashes is data, never expression syntax.
    r = post(service, {"query": QUERY, "filter": {"field": "id", "op": "eq", "value": '3" or id != "'}})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == []


def test_repeated_queries_hit_the_cache(service):
    before = requests.get(service["base"] + "/stats", timeout=10).json()["cache"]
    first = post(service, {"query": "  Supersonic   flutter of panels "}).json()
    again = post(service, {"query": "Supersonic flutter of panels"}).json()
    after = requests.get(service["base"] + "/stats", timeout=10).json()["cache"]
    assert first["cache_hits"] == 0 and again["cache_hits"] == 1
    assert after["hits"] - before["hits"] == 1 and after["misses"] - before["misses"] == 1
    assert [h["id"] for h in first["results"]] == [h["id"] for h in again["results"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x" * 5000}, "query"),
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "k": 101}, "k"),
        ({"query": "x", "k": "ten"}, "k"),
        ({"query": "x", "ef": 100000}, "ef"),
        ({"k": 3}, "query"),
        ({"query": "x", "queries": ["y"]}, "query"),
        ({"queries": []}, "queries"),
        ({"queries": ["ok", ""]}, "queries[1]"),
        ({"query": 42}, "query"),
        ({"query": "x", "top": 3}, "top"),
        ({"query": "x", "partitions": ["nope"]}, "partitions[0]"),
        ({"query": "x", "filter": [{"field": "nope", "value": "a"}]}, "filter[0].field"),
        ({"query": "x", "filter": [{"field": "id", "op": "like", "value": "a"}]}, "filter[0].op"),
        ({"query": "x", "filter": [{"field": "id", "value": 7}]}, "filter[0].value"),
        ({"query": "x", "filter": [{"field": "id", "value": "a\ud800b"}]}, "filter[0].value"),
        ({"query": "x", "filter": "id == 3"}, "filter"),
        ({"query": "x", "fields": ["vector"]}, "fields[0]"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(service, body, field):
    err = error_of(post(service, body))
    assert err["field"] == field, err
    assert err["code"] == "invalid_request"


def test_malformed_json_is_a_400(service):
    r = requests.post(
        service["base"] + "/search", data="{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert "JSON" in error_of(r)["message"]


def test_api_key(service):
    body = {"query": QUERY, "k": 1}
    assert error_of(post(service, body, path="/secure/search"), 401)["code"] == "unauthorized"
    wrong = post(service, body, path="/secure/search", headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["field"] == "Authorization"
    ok = post(service, body, path="/secure/search", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["results"][0]["id"] == "3"
    assert ok.json()["collection"] == "docs"  # searched through the alias docs_live
    assert requests.get(service["base"] + "/secure/healthz", timeout=10).status_code == 200


def test_embedding_in_the_ingress_answers_as_the_embedder_deployment_does(service):
    """The secured app embeds in its ingress (embed_in=ingress): the same hits and scores as the main
    app, whose queries go to its QueryEmbedder deployment, and the model calls are the ingress's own."""
    from ray import serve

    auth = {"Authorization": f"Bearer {API_KEY}"}
    text = "pressure distribution on a slender body of revolution at supersonic speed"
    here = post(service, {"query": text, "k": 5}, path="/secure/search", headers=auth)
    there = post(service, {"query": text, "k": 5})
    assert here.status_code == there.status_code == 200, (here.text, there.text)
    assert [(h["id"], h["score"]) for h in here.json()["results"]] == [
        (h["id"], h["score"]) for h in there.json()["results"]
    ]
    stats = requests.get(service["base"] + "/secure/stats", headers=auth, timeout=10).json()
    (calls,) = stats["embedder"].values()
    assert calls["queries"] >= 1 and calls["model_calls"] >= 1
    assert set(serve.status().applications["secure"].deployments) == {"SearchIngress"}


def test_a_model_that_does_not_match_the_collection_is_refused(service):
    base = service["base"] + "/bad"
    assert requests.get(base + "/healthz", timeout=10).status_code == 200
    r = requests.get(base + "/readyz", timeout=60)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_mismatch"
    assert "weights" in r.json()["error"]["message"]
    err = error_of(post(service, {"query": QUERY}, path="/bad/search"), 503)
    assert err["code"] == "model_mismatch"


def test_milvus_down_gives_503_and_the_service_recovers(service):
    lite: LiteServer = service["lite"]
    lite.__exit__(None, None, None)
    try:
        time.sleep(1.5)  # past identity_refresh_s, so the service talks to Milvus
        err = error_of(post(service, {"query": "a query while Milvus is down"}), 503)
        assert err["code"] == "milvus_unavailable"
        ready = requests.get(service["base"] + "/readyz", timeout=60)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "milvus_unavailable"
        assert requests.get(service["base"] + "/healthz", timeout=10).status_code == 200
    finally:
        lite.__enter__()  # same .db, same port
    deadline = time.monotonic() + 60
    while True:
        r = post(service, {"query": QUERY, "k": 1})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "3"
    assert _wait_ready(service["base"] + "/readyz", 30).status_code == 200


def test_concurrent_queries_share_model_calls_and_each_gets_its_own_answer(service, cranfield):
    """Queries that wait for the model are merged into its next call (serve/coalesce.py): 24 distinct
    queries sent at once take fewer model calls than queries, and fewer Milvus searches than requests,
    and each answer is its query's own."""
    from ray import serve

    async def stats() -> dict:
        # In an event loop: in the throughput-optimised mode (serve/runtime.py) a handle's router runs
        # on the caller's loop.
        return await serve.get_deployment_handle("QueryEmbedder", app_name="main").stats.remote()

    loop = asyncio.new_event_loop()  # one loop for the handle's whole life (left open for Serve's shutdown)

    def counts() -> tuple[int, int]:
        s = loop.run_until_complete(stats())
        return sum(m["model_calls"] for m in s.values()), sum(m["queries"] for m in s.values())

    texts = [q["text"] for q in read_jsonl(cranfield / "queries.jsonl")[100:124]]  # distinct rankings
    alone = {t: post(service, {"query": t, "k": 3}).json()["results"] for t in texts[:3]}
    calls0, queries0 = counts()
    searches0 = requests.get(service["base"] + "/stats", timeout=10).json()["searches"]
    with ThreadPoolExecutor(len(texts)) as pool:
        replies = list(pool.map(lambda t: post(service, {"query": t + " ", "k": 3}), texts))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:2]
    for t in texts[:3]:  # the trailing space is normalised away: a cache hit, the same vector
        assert [h["id"] for h in replies[texts.index(t)].json()["results"]] == [h["id"] for h in alone[t]]
    calls1, queries1 = counts()
    assert queries1 - queries0 == 21  # the 21 queries the cache had not seen, each embedded once
    assert calls1 - calls0 < 21, f"{calls1 - calls0} model calls for 21 queries: nothing was merged"
    # Their Milvus searches were merged too (serve/service.py): fewer searches than requests.
    searches1 = requests.get(service["base"] + "/stats", timeout=10).json()["searches"]
    assert searches1["queries"] - searches0["queries"] == len(texts)
    assert searches1["milvus_calls"] - searches0["milvus_calls"] < len(texts), (searches0, searches1)
    # Each merged answer is its own query's: the same ranking as the in-process Searcher gives it.
    store = MilvusStore(service["lite"].uri)
    try:
        hits, _ = Searcher(store, "docs", device="cpu").search(texts, k=3)
    finally:
        store.close()
    for t, r, expected in zip(texts, replies, hits, strict=True):
        assert [h["id"] for h in r.json()["results"]] == [h.id for h in expected], t


def test_metrics_reach_prometheus(service, ray_local):
    """Ray exports the service's metrics on each node's Prometheus endpoint (what the dashboard reads)."""
    port = ray_local.nodes()[0]["MetricsExportPort"]
    post(service, {"query": QUERY})
    wanted = (
        "reembed_requests",
        "reembed_embed_ms",
        "reembed_search_ms",
        "reembed_cache_hit_ratio",
        "reembed_embed_batch_size",
        "reembed_search_batch_size",
    )
    deadline = time.monotonic() + 60
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [name for name in wanted if name not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"not exported: {missing}"
    assert 'status="400"' in text and 'status="200"' in text
