"""The query models of the embedder deployment (and of the ingress with embed_in=ingress), without
Serve: batching and model checks."""

import asyncio

import numpy as np
import pytest

from reembed.config import ServiceConfig
from reembed.embedder import Embedder, describe_model
from reembed.errors import ModelMismatchError
from serve.app import QueryModels


@pytest.fixture(scope="module")
def minilm():
    source, identity = describe_model("sentence-transformers/all-MiniLM-L6-v2")
    return source, identity.to_dict()


def test_a_batch_matches_one_by_one_and_groups_by_model(minilm, tiny_model):
    source, model = minilm
    _, tiny = describe_model(str(tiny_model))
    embedder = QueryModels(ServiceConfig(device="cpu"))
    texts = [f"query number {i}" for i in range(5)]
    models = [model, tiny.to_dict(), model, model, tiny.to_dict()]
    got = asyncio.run(embedder.embed_many(models, texts))
    assert [len(v) for v in got] == [384, 32, 384, 384, 32]
    one_by_one = Embedder(source, device="cpu")
    for i in (0, 2, 3):  # batch-invariant: the same floats as each query alone
        np.testing.assert_array_equal(got[i], one_by_one.encode_queries([texts[i]])[0])


def test_check_refuses_other_weights(minilm):
    _, model = minilm
    embedder = QueryModels(ServiceConfig(device="cpu"))
    info = asyncio.run(embedder.check(model))
    assert info["dimension"] == model["dimension"]
    with pytest.raises(ModelMismatchError, match="weights"):
        asyncio.run(embedder.check({**model, "weights_sha256": "0" * 64}))
