"""Batch size: the probe's growth and stop rules, out-of-memory back-off, the cache, the embedder's use of them."""

import json

import numpy as np
import pytest

from reembed import batching
from reembed.batching import BatchSizeCache, probe_batch_size, run_with_backoff
from reembed.config import BackfillConfig, load_settings
from reembed.errors import ConfigError


class FakeClock:
    """Time advances only when the fake encode says so: the rates are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed_encode(clock: FakeClock, docs: int, rate_at: dict[int, float], oom_above: int | None = None):
    calls: list[int] = []

    def encode(b: int) -> None:
        calls.append(b)
        if oom_above is not None and b > oom_above:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {b} MiB")
        clock.now += docs / rate_at[b]

    return encode, calls


def test_probe_doubles_while_throughput_grows_and_stops_at_the_first_flat_step():
    clock = FakeClock()
    rates = {8: 100.0, 16: 180.0, 32: 250.0, 64: 255.0, 128: 400.0}  # 64 gains 2 %: stop there
    encode, calls = timed_encode(clock, 256, rates)
    result = probe_batch_size(encode, docs=256, start=8, cap=1024, clock=clock)
    assert calls == [8, 16, 32, 64]
    assert result.batch_size == 32  # the last size that paid for its memory
    assert [b for b, _ in result.trials] == [8, 16, 32, 64]
    assert result.trials[0][1] == pytest.approx(100.0)


def test_probe_stops_at_the_cap_and_at_the_sample_size():
    clock = FakeClock()
    rates = {b: 100.0 * b for b in (8, 16, 32, 64, 128, 256)}  # always growing, within the time budget
    encode, calls = timed_encode(clock, 1000, rates)
    assert probe_batch_size(encode, docs=1000, start=8, cap=64, clock=clock).batch_size == 64
    assert calls == [8, 16, 32, 64]
    encode, calls = timed_encode(clock, 20, {8: 1.0, 16: 2.0, 20: 3.0})
    assert probe_batch_size(encode, docs=20, start=8, cap=1024, clock=clock).batch_size == 20
    assert calls == [8, 16, 20]  # never a batch larger than the sample


def test_probe_stops_when_the_time_budget_is_spent():
    clock = FakeClock()
    rates = {8: 8.0, 16: 16.0, 32: 32.0, 64: 64.0}  # trials of 64 texts take 8 s, 4 s, 2 s, 1 s
    encode, calls = timed_encode(clock, 64, rates)
    assert probe_batch_size(encode, docs=64, start=8, cap=64, budget_s=10.0, clock=clock).batch_size == 16
    assert calls == [8, 16]


def test_probe_halves_on_out_of_memory_and_keeps_the_last_size_that_fitted():
    clock = FakeClock()
    rates = {b: 100.0 * b for b in (4, 8, 16, 32, 64)}
    freed = []
    encode, calls = timed_encode(clock, 512, rates, oom_above=16)
    result = probe_batch_size(encode, docs=512, start=64, cap=512, on_oom=lambda: freed.append(1), clock=clock)
    # 64 and 32 do not fit: halve until 16 fits; then 32 fails again and 16 stays.
    assert calls == [64, 32, 16, 32] and result.batch_size == 16
    assert result.out_of_memory == [64, 32, 32] and len(freed) == 3
    assert result.to_dict()["batch_size"] == 16


def test_probe_raises_when_even_one_text_does_not_fit_or_on_other_errors():
    def always_oom(b):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        probe_batch_size(always_oom, docs=8, start=4)

    def broken(b):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        probe_batch_size(broken, docs=8)
    with pytest.raises(ValueError, match="docs"):
        probe_batch_size(lambda b: None, docs=0)


def test_run_with_backoff_halves_and_retries_the_same_items_so_nothing_is_lost():
    done: list[int] = []
    sizes: list[int] = []
    told: list[int] = []

    def run(chunk):
        sizes.append(len(chunk))
        if len(chunk) > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        done.extend(chunk)

    final = run_with_backoff(list(range(40)), 32, run, on_oom=told.append)
    assert done == list(range(40))  # every item once, in order
    assert final == 4 and told == [16, 8, 4]
    assert sizes[:4] == [32, 16, 8, 4] and set(sizes[4:]) <= {4}


def test_run_with_backoff_raises_other_errors_and_an_oom_at_size_one():
    def oom(chunk):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run_with_backoff([1, 2, 3], 4, oom)

    def bad(chunk):
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_with_backoff([1, 2, 3], 4, bad)
    assert run_with_backoff([], 8, bad) == 8


def test_out_of_memory_is_recognised():
    assert batching.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert batching.is_out_of_memory(MemoryError())
    assert not batching.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not batching.is_out_of_memory(ValueError("out of memory"))


def test_cache_round_trip_and_damaged_file(tmp_path):
    path = tmp_path / "sub" / "sizes.json"
    cache = BatchSizeCache(path)
    key = batching.cache_key("m", "abc", "NVIDIA H100", "float16", "torch")
    assert cache.get(key) is None
    cache.put(key, 512)
    cache.put("other", 8)
    assert BatchSizeCache(path).get(key) == 512 and json.loads(path.read_text())["other"] == 8
    # Keys differ by every part: the same model on another device or dtype probes again.
    assert key != batching.cache_key("m", "abc", "NVIDIA H100", "bfloat16", "torch")
    path.write_text("{not json")
    assert BatchSizeCache(path).get(key) is None
    BatchSizeCache(path).put(key, 64)
    assert BatchSizeCache(path).get(key) == 64


def test_cache_path_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path / "c.json"))
    assert BatchSizeCache().path == tmp_path / "c.json"


def test_batch_size_flag_takes_a_number_or_auto(tmp_path):
    base = {"input": str(tmp_path)}
    assert load_settings(BackfillConfig, {**base, "batch_size": "auto"}).batch_size == "auto"
    assert load_settings(BackfillConfig, {**base, "batch_size": "128"}).batch_size == 128
    assert load_settings(BackfillConfig, base).batch_size == 64
    for bad in ("0", "fast", "5000"):
        with pytest.raises(ConfigError, match="batch_size"):
            load_settings(BackfillConfig, {**base, "batch_size": bad})


def test_rows_per_call_with_an_automatic_batch_size():
    from jobs.pipeline import AUTO_ROWS_PER_CALL, plan_compute

    plan = plan_compute(None, "cpu", "auto", 1, 512, None, shape=(4.0, 0, 1))
    assert plan.batch_size == "auto" and plan.rows_per_call == AUTO_ROWS_PER_CALL["cpu"]
    assert plan_compute(None, "cpu", 32, 1, 512, None, shape=(4.0, 0, 1)).rows_per_call == 32


class OomAbove:
    """Wraps a model's forward: raises CUDA's OOM message for batches larger than `limit`."""

    def __init__(self, forward, limit: int) -> None:
        self.forward, self.limit, self.sizes = forward, limit, []

    def __call__(self, features):
        n = len(features["input_ids"])
        self.sizes.append(n)
        if n > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return self.forward(features)


@pytest.fixture(scope="module")
def minilm_auto(tmp_path_factory):
    from reembed.embedder import Embedder, resolve_model

    cache = BatchSizeCache(tmp_path_factory.mktemp("cache") / "sizes.json")
    return Embedder(resolve_model("all-MiniLM-L6-v2"), device="cpu", batch_size="auto", batch_cache=cache)


def test_embedder_oom_during_the_run_halves_and_loses_nothing(minilm_auto, monkeypatch):
    texts = [f"document number {i} about wings" for i in range(24)]  # one length bucket
    minilm_auto.batch_size = 16
    reference = minilm_auto.encode_documents(texts)
    fake = OomAbove(minilm_auto.model.forward, limit=5)
    monkeypatch.setattr(minilm_auto.model, "forward", fake)
    got = minilm_auto.encode_documents(texts)
    assert np.array_equal(got, reference)  # same vectors, same order, no text dropped
    assert fake.sizes[:3] == [16, 8, 4] and minilm_auto.batch_size == 4
    # An automatic size that had to shrink is remembered for the next actor.
    assert minilm_auto.batch_cache.get(minilm_auto.batch_cache_key()) == 4


def test_embedder_auto_probes_once_then_uses_the_cache(minilm_auto, tmp_path, cranfield):
    from reembed.embedder import Embedder
    from tests.conftest import read_jsonl

    texts = [d["title"] for d in read_jsonl(cranfield / "corpus.jsonl")[:200]]
    emb = Embedder(minilm_auto.source, device="cpu", batch_size="auto", batch_cache=BatchSizeCache(tmp_path / "c.json"))
    assert emb.batch_size is None
    vectors = emb.encode_documents(texts)
    assert emb.probe is not None and emb.batch_size == emb.probe.batch_size >= 8
    minilm_auto.batch_size = 64
    assert np.array_equal(vectors, minilm_auto.encode_documents(texts))  # the size found changes no bit
    again = Embedder(emb.source, device="cpu", batch_size="auto", batch_cache=BatchSizeCache(tmp_path / "c.json"))
    again.encode_documents(texts[:3])
    assert again.probe is None and again.batch_size == emb.batch_size  # from the cache, no probe


def test_length_buckets_sort_inside_a_call_and_restore_input_order(minilm_auto):
    texts = [
        "a much longer text about the boundary layer of a swept wing " * 6,  # 80 positions
        "short",  # 16
        "a text of middling length about the pressure distribution over a cone in supersonic flow",  # 32
        "tiny",  # 16: shares a batch with "short"
    ]
    minilm_auto.batch_size = 64
    seen = []
    forward = minilm_auto.model.forward

    def record(features):
        seen.append(features["input_ids"].shape)
        return forward(features)

    minilm_auto.model.forward = record
    try:
        mixed = minilm_auto.encode_documents(texts)
    finally:
        del minilm_auto.model.forward
    assert [s[1] for s in seen] == sorted(s[1] for s in seen)  # one batch per length, shortest first
    assert [tuple(s) for s in seen] == [(2, 16), (1, 32), (1, 80)]
    one_by_one = np.concatenate([minilm_auto.encode_documents([t]) for t in texts])
    assert np.array_equal(mixed, one_by_one)  # rows back in input order
