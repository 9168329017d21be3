import numpy as np

from reembed.cache import EmbeddingCache, normalize_query


def test_normalize_collapses_whitespace_and_keeps_case():
    assert normalize_query("  Heat\t transfer \n") == "Heat transfer"
    assert normalize_query("ﬁlm") == "film"  # NFKC folds the ligature


def test_hits_misses_and_lru_eviction():
    cache = EmbeddingCache(2)
    v = np.ones(3, dtype=np.float32)
    assert cache.get("m", "a") is None
    cache.put("m", "a", v)
    cache.put("m", "b", 2 * v)
    assert np.array_equal(cache.get("m", "a"), v)  # a is now the most recent
    cache.put("m", "c", 3 * v)  # evicts b
    assert cache.get("m", "b") is None
    assert np.array_equal(cache.get("m", "c"), 3 * v)
    s = cache.stats()
    assert (s.hits, s.misses, s.size, s.capacity) == (2, 2, 2, 2)
    assert s.hit_ratio == 0.5


def test_key_includes_the_model():
    cache = EmbeddingCache(10)
    cache.put("model-a", "q", np.zeros(2, dtype=np.float32))
    assert cache.get("model-b", "q") is None


def test_cached_vectors_are_read_only_copies():
    cache = EmbeddingCache(10)
    original = np.ones(2, dtype=np.float32)
    cache.put("m", "q", original)
    original[0] = 5
    got = cache.get("m", "q")
    assert got[0] == 1 and not got.flags.writeable


def test_zero_capacity_disables():
    cache = EmbeddingCache(0)
    cache.put("m", "q", np.ones(2, dtype=np.float32))
    assert cache.get("m", "q") is None and cache.stats().size == 0
