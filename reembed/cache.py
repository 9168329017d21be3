"""An LRU cache of query embeddings, keyed by model identity and normalised query text.

Sits in front of the query embedder in the service: a repeated query skips the model. The key
carries the model's weights hash, so after a model migration the old entries can never answer
for the new model.
"""

from __future__ import annotations

import threading
import unicodedata
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache


def normalize_query(text: str) -> str:
    """NFKC, whitespace collapsed, trimmed. Case is kept: cased models see it."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    size: int = 0
    capacity: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class EmbeddingCache:
    """Thread-safe LRU of float32 query vectors; `capacity` 0 disables it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: LRUCache | None = LRUCache(maxsize=capacity) if capacity > 0 else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, model_key: str, query: str) -> np.ndarray | None:
        with self._lock:
            vector = self._lru.get((model_key, query)) if self._lru is not None else None
            if vector is None:
                self.misses += 1
            else:
                self.hits += 1
            return vector

    def put(self, model_key: str, query: str, vector: np.ndarray) -> None:
        if self._lru is None:
            return
        vector = np.array(vector, dtype=np.float32, copy=True)
        vector.setflags(write=False)  # shared by every later hit
        with self._lock:
            self._lru[(model_key, query)] = vector

    def stats(self) -> CacheStats:
        with self._lock:
            size = len(self._lru) if self._lru is not None else 0
            return CacheStats(self.hits, self.misses, size, self.capacity)
