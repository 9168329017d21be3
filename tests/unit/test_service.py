"""Request validation and config of the search service, without Ray or Milvus."""

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from reembed.config import ServiceConfig
from reembed.search import QueryCodec
from reembed.store import CollectionIdentity
from serve.models import SearchRequest
from serve.service import RequestError, SearchService, Target


def make_target() -> Target:
    identity = CollectionIdentity(
        model={"name": "m", "weights_sha256": "a" * 64, "dimension": 4},
        precision="float32",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        partitioning={"kind": "single"},
        hnsw={"M": 16, "efConstruction": 64},
    )
    return Target(
        collection="docs",
        model=identity.model,
        model_key="m@aaaa/4",
        codec=QueryCodec(identity),
        identity_json=identity.to_json(),
        partitions=frozenset({"_default", "p1"}),
        scalar_fields={"id": "string", "text": "string", "partition": "string"},
        resolved_at=0.0,
    )


async def _no_embed(model, texts):
    raise AssertionError("not called")


async def _no_check(model):
    return {}


def service(**cfg) -> SearchService:
    return SearchService(ServiceConfig(milvus_uri="http://127.0.0.1:1", **cfg), _no_embed, _no_check)


def test_valid_request_compiles_everything():
    req = SearchRequest(
        queries=["  a   b ", "c"], k=3, ef=50, partitions=["p1", "p1"], filter={"field": "id", "op": "ne", "value": "x"}
    )
    texts, k, ef, expr, parts, fields = service().validate(req, make_target())
    assert texts == ["a b", "c"] and (k, ef) == (3, 50)
    assert expr == '(id != "x")' and parts == ["p1"] and fields == ["text", "partition"]


def test_defaults_come_from_config():
    texts, k, ef, expr, parts, fields = service(default_k=7, default_ef=99).validate(
        SearchRequest(query="q", fields=["id"]), make_target()
    )
    assert (k, ef, expr, parts, fields) == (7, 99, "", None, [])


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (SearchRequest(query="q", k=11), "k"),
        (SearchRequest(query="q", ef=2000), "ef"),
        (SearchRequest(query="x" * 20), "query"),
        (SearchRequest(queries=["a"] * 5), "queries"),
        (SearchRequest(query="q", partitions=["zzz"]), "partitions[0]"),
        (SearchRequest(query="q", partitions=[]), "partitions"),
        (SearchRequest(query="q", fields=["vector"]), "fields[0]"),
        (
            SearchRequest(query="q", filter=[{"field": "id", "value": "a"}, {"field": "x", "value": 1}]),
            "filter[1].field",
        ),
    ],
)
def test_out_of_bounds_requests_name_the_field(req, field):
    with pytest.raises(RequestError) as info:
        service(max_k=10, max_query_chars=10, max_batch_queries=4).validate(req, make_target())
    assert info.value.status == 400 and info.value.field == field
    assert info.value.message.startswith(field + ":")


def test_request_model_refuses_unknown_keys_and_both_forms():
    with pytest.raises(ValidationError):
        SearchRequest(query="a", top=3)
    with pytest.raises(ValidationError):
        SearchRequest(query="a", queries=["b"])
    with pytest.raises(ValidationError):
        SearchRequest(query=3)


def test_config_bounds_fail_before_start():
    with pytest.raises(ValidationError, match="min_replicas"):
        ServiceConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="ingress_replicas"):
        ServiceConfig(milvus_uri="./data/x.db", ingress_replicas=2)
    with pytest.raises(ValidationError, match="default_k"):
        ServiceConfig(default_k=50, max_k=10)
    assert ServiceConfig(output_fields="text, partition").output_fields == ["text", "partition"]


def test_embedder_torch_threads_default_to_its_cpus_and_a_bad_count_fails_before_start():
    assert ServiceConfig().embedder_torch_threads == 1
    assert ServiceConfig(embedder_num_cpus=2.5).embedder_torch_threads == 2
    assert ServiceConfig(embedder_num_cpus=0.5).embedder_torch_threads == 1
    assert ServiceConfig(embedder_num_cpus=1, embedder_threads=4).embedder_torch_threads == 4
    with pytest.raises(ValidationError, match="embedder_threads"):
        ServiceConfig(embedder_threads=0)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("REEMBED_API_KEY", "k1")
    assert ServiceConfig().api_key == "k1"


def test_cache_serves_repeats_without_the_model():
    calls = []

    async def embed(model, texts):
        calls.append(list(texts))
        return [np.full(4, float(len(t)), dtype=np.float32) for t in texts]

    svc = SearchService(ServiceConfig(milvus_uri="http://127.0.0.1:1"), embed, _no_check)
    target = make_target()
    first, hits1 = asyncio.run(svc._vectors(target, ["ab", "abc"]))
    second, hits2 = asyncio.run(svc._vectors(target, ["abc", "abcd"]))
    assert calls == [["ab", "abc"], ["abcd"]]
    assert (hits1, hits2) == (0, 1)
    assert np.array_equal(second[0], first[1])
    assert svc.stats()["cache"]["hits"] == 1


def test_embed_in_ingress_is_one_deployment_with_the_embedders_resources_and_scaling():
    from serve.app import build_app

    split = build_app(ServiceConfig(device="cpu", embedder_num_cpus=2, ingress_num_cpus=0.5))
    ingress = split._bound_deployment
    embedder = ingress.init_args[1]._bound_deployment
    assert (ingress.name, embedder.name) == ("SearchIngress", "QueryEmbedder")
    assert ingress.ray_actor_options["num_cpus"] == 0.5 and embedder.ray_actor_options["num_cpus"] == 2

    one = build_app(
        ServiceConfig(
            device="cpu", embed_in="ingress", milvus_uri="http://milvus:19530", max_replicas=3, embedder_num_cpus=2
        )
    )._bound_deployment
    assert one.name == "SearchIngress" and one.init_args[1] is None  # no embedder deployment behind it
    assert one.ray_actor_options == {"num_cpus": 2.5, "num_gpus": 0.0}
    scaling = one._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)

    lite = build_app(ServiceConfig(device="cpu", embed_in="ingress", milvus_uri="./data/x.db"))._bound_deployment
    assert lite.num_replicas == 1 and lite._deployment_config.autoscaling_config is None  # one process opens a .db


def test_embed_in_ingress_refuses_settings_it_cannot_honour():
    with pytest.raises(ValidationError, match="ingress_replicas: with embed_in=ingress"):
        ServiceConfig(embed_in="ingress", milvus_uri="http://milvus:19530", ingress_replicas=4)
    with pytest.raises(ValidationError, match="max_replicas: a Milvus Lite .db"):
        ServiceConfig(embed_in="ingress", milvus_uri="./data/x.db", max_replicas=2)
    with pytest.raises(ValidationError, match="embed_in"):
        ServiceConfig(embed_in="replica")
    assert ServiceConfig(embed_in="ingress", milvus_uri="./data/x.db").max_replicas == 2  # the default: not used
