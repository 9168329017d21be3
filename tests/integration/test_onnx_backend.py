"""--backend onnx: the int8 transformer in onnxruntime against the torch embeddings of the same texts."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'reembed[onnx]'")

from reembed.backends import INT8_FILE, ONNX_INT8_DTYPE, onnx_cache_dir  # noqa: E402
from reembed.embedder import Embedder, resolve_model  # noqa: E402
from reembed.store import CollectionIdentity  # noqa: E402
from tests.conftest import read_jsonl  # noqa: E402

pytestmark = pytest.mark.integration


def test_int8_onnx_embeddings_stay_close_to_torch(tmp_path, monkeypatch, cranfield):
    monkeypatch.setenv("REEMBED_ONNX_CACHE", str(tmp_path / "onnx"))
    source = resolve_model("all-MiniLM-L6-v2")
    docs = read_jsonl(cranfield / "corpus.jsonl")[:24]
    texts = [d["title"] + " " + d["text"] for d in docs] + ["lift", "what is the drag of a cone?"]
    torch_emb = Embedder(source, device="cpu", batch_size=16)
    onnx_emb = Embedder(source, device="cpu", batch_size=16, backend="onnx")
    assert (onnx_cache_dir(source.path) / INT8_FILE).is_file()
    a, b = torch_emb.encode_documents(texts), onnx_emb.encode_documents(texts)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() >= 0.98, f"int8 ONNX drifted from torch: min cosine {cosine.min():.4f}"
    # Batch invariance holds for the int8 backend too (it runs one text at a time: activation scales are
    # per tensor): one text alone gives the same floats.
    assert onnx_emb.batch_size == 1
    assert np.array_equal(onnx_emb.encode_documents(texts[:1]), b[:1])
    # Queries and documents go through the same int8 model.
    assert np.array_equal(onnx_emb.encode_queries(texts[-1:]), b[-1:])

    identity = onnx_emb.identity()
    assert identity.backend == "onnx" and identity.dtype == ONNX_INT8_DTYPE
    assert identity.weights_sha256 == torch_emb.identity().weights_sha256  # same source weights

    def collection(model):
        return CollectionIdentity(model.to_dict(), "int8", "FLOAT_VECTOR", None, {"scheme": "hash", "partitions": 1})

    assert collection(identity).differences(collection(torch_emb.identity())) == [
        "model.backend: collection has 'onnx', this run has 'torch'"
    ]
    # A second actor reuses the exported file.
    again = Embedder(source, device="cpu", backend="onnx")
    assert np.array_equal(again.encode_documents(texts[:2]), b[:2])
