"""A bounded load test through a model migration: the search service (Ray Serve, real HTTP) answers
concurrent clients while jobs.migrate switches its alias from MiniLM (int8, 384-d) to a tiny local
model (float32, 32-d) and rolls it back. Zero errors are allowed, and every answer must come from one
(collection, model) pair: the ranking it returns is recomputed in-process with the model recorded in
that collection and must be the same. Runs on the real Milvus 2.3.5 server where port 19530 is free,
on a Milvus Lite server otherwise."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter

import pytest
import requests

from jobs.migrate import main
from reembed.config import ServiceConfig
from reembed.lite import LiteServer
from reembed.search import Searcher, model_key
from reembed.store import MilvusStore
from tests.conftest import cranfield_docs, read_jsonl, write_jsonl

pytestmark = pytest.mark.integration

N_DOCS = 150
CLIENTS = 4
K = 5
MAX_REQUESTS = 5000  # the load stops by itself
MAX_SECONDS = 120.0
REFRESH_S = 0.5  # the service re-reads the alias this often (ServiceConfig.identity_refresh_s)
# A re-read is a describe + load call to Milvus run in the background: on a busy 2-core machine it
# can take a while, and a request sent before it finishes is still answered by the old pair.
REFRESH_SLACK_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_uri(request, tmp_path_factory):
    try:
        uri = request.getfixturevalue("milvus_server")
    except pytest.skip.Exception:
        uri = None  # port 19530 busy or no `milvus` package: the same test on Milvus Lite
    if uri:
        yield uri
        return
    with LiteServer(str(tmp_path_factory.mktemp("live") / "live.db")) as lite_uri:
        yield lite_uri


@pytest.fixture(scope="module")
def versions(tmp_path_factory, cranfield, ray_local, tiny_model, milvus_uri):
    """live_v1 (MiniLM, int8) behind the alias `live`, and live_v2 (tiny, float32) built and gated."""
    root = tmp_path_factory.mktemp("migrate-serve")
    corpus = write_jsonl(root / "corpus.jsonl", cranfield_docs(cranfield, N_DOCS))
    common = ["--alias", "live", "--milvus-uri", milvus_uri, "--input", str(corpus), "--output-dir", str(root)]
    common += ["--actors", "1", "--writers", "1", "--device", "cpu", "--gate-queries", "20"]
    assert main([*common, "--to-model", "all-MiniLM-L6-v2", "--calibration-sample", "64"]) == 0
    assert main([*common, "--to-model", str(tiny_model), "--precision", "float32", "--gate-max-ndcg-drop", "off"]) == 0
    store = MilvusStore(milvus_uri)
    try:
        assert store.alias_target("live") == "live_v1"
        keys = {c: model_key(store.read_identity(c).model) for c in ("live_v1", "live_v2")}
    finally:
        store.close()
    return {"uri": milvus_uri, "keys": keys}


@pytest.fixture(scope="module")
def service(versions, ray_local):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServiceConfig(
        milvus_uri=versions["uri"],
        collection="live",
        min_replicas=1,
        max_replicas=1,
        embedder_num_cpus=0.25,
        ingress_num_cpus=0.25,
        identity_refresh_s=REFRESH_S,
        search_timeout_s=10.0,
    )
    serve.run(build_app(cfg), name="live", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(base + "/readyz", timeout=10).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.5)
    yield base
    serve.shutdown()  # later modules start Serve on ports of their own


class Load:
    """CLIENTS threads sending single queries until stopped (or MAX_REQUESTS / MAX_SECONDS)."""

    def __init__(self, base: str, texts: list[str]) -> None:
        self.base, self.texts = base, texts
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while not self.stop.is_set() and time.monotonic() - self.started < MAX_SECONDS:
            with self.lock:
                if len(self.results) + len(self.errors) >= MAX_REQUESTS:
                    return
            # Half repeat a few texts (cache hits), half are new (the embedder runs during the switch).
            text = rng.choice(self.texts[:5]) if rng.random() < 0.5 else rng.choice(self.texts)
            t0 = time.monotonic()
            try:
                r = session.post(self.base + "/search", json={"query": text, "k": K}, timeout=60)
            except requests.RequestException as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.monotonic()
            with self.lock:
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                body = r.json()
                self.results.append(
                    {
                        "text": text,
                        "sent": t0,
                        "done": t1,
                        "collection": body["collection"],
                        "model_key": body["model_key"],
                        "ids": [h["id"] for h in body["results"]],
                    }
                )

    def seen_since(self, collection: str, since: float) -> bool:
        with self.lock:
            return any(r["collection"] == collection and r["sent"] >= since for r in self.results)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def _wait_for(load: Load, collection: str, since: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while not load.seen_since(collection, since):
        assert time.monotonic() < deadline, f"no answer from {collection} within {timeout:.0f} s"
        time.sleep(0.1)
    return time.monotonic()


def test_switch_and_rollback_under_load(service, versions, cranfield, capsys):
    texts = [q["text"] for q in read_jsonl(cranfield / "queries.jsonl")[:40]]
    migrate = ["--alias", "live", "--milvus-uri", versions["uri"]]
    with Load(service, texts) as load:
        time.sleep(3.0)
        switch_at = time.monotonic()
        assert main([*migrate, "--switch-to", "2"]) == 0
        switched = time.monotonic()
        followed = _wait_for(load, "live_v2", switched) - switched
        time.sleep(2.0)
        rollback_at = time.monotonic()
        assert main([*migrate, "--rollback"]) == 0
        rolled_back = time.monotonic()
        _wait_for(load, "live_v1", rolled_back)
        time.sleep(2.0)
    capsys.readouterr()

    assert load.errors == [], load.errors[:5]
    results = load.results
    by_collection = Counter(r["collection"] for r in results)
    assert set(by_collection) == {"live_v1", "live_v2"} and min(by_collection.values()) >= 10, by_collection
    # One pair per answer: the collection searched and the model that embedded the query.
    keys = versions["keys"]
    assert {(r["collection"], r["model_key"]) for r in results} == set(keys.items())
    assert keys["live_v1"].endswith("/384") and keys["live_v2"].endswith("/32")
    # live_v2 answers only requests sent after the switch began, and none sent later than one alias
    # re-read after the rollback finished: the service follows an alias switch within
    # identity_refresh_s (plus the re-read itself), it does not look the alias up per request.
    v2 = [r for r in results if r["collection"] == "live_v2"]
    assert min(r["sent"] for r in v2) >= switch_at
    late = max(r["sent"] for r in v2) - rolled_back
    assert late <= REFRESH_S + REFRESH_SLACK_S, f"live_v2 still answered a request sent {late:.2f} s after the rollback"
    assert any(r["collection"] == "live_v1" and r["done"] > rollback_at for r in results)

    # Every answer is the ranking its collection's own model gives (in-process, same int8 codes).
    store = MilvusStore(versions["uri"])
    try:
        for collection in ("live_v1", "live_v2"):
            rows = [r for r in results if r["collection"] == collection]
            distinct = sorted({r["text"] for r in rows})
            hits, _ = Searcher(store, collection, device="cpu").search(distinct, k=K)
            expected = {text: [h.id for h in row] for text, row in zip(distinct, hits, strict=True)}
            wrong = [r for r in rows if r["ids"] != expected[r["text"]]]
            assert not wrong, f"{len(wrong)} of {len(rows)} answers from {collection} differ, e.g. {wrong[0]}"
    finally:
        store.close()
    rate = len(results) / (results[-1]["done"] - load.started)
    print(
        f"{len(results)} answers ({dict(by_collection)}), {rate:.1f}/s; --switch-to took {switched - switch_at:.2f} s, "
        f"the service followed within {followed:.2f} s; Milvus at {versions['uri']}"
    )
