"""int8 calibration and codes, fitted once and reused for every batch and every query.

Sits between the embedder and the store. The calibration is an artifact: fitted on a sample of
the corpus at the first backfill, written into the collection's properties, read back by every
later run and by the search service. No function here fits on the batch it is handed.

Codes are symmetric (no zero point): code = clip(round(x / scale * 127), -127, 127). Milvus ranks
int8 vectors by the inner product of the codes; with one global scale that product is
(127 / scale)^2 * <x, y> up to rounding, so code space keeps float ranking. A zero point adds
terms that depend on each vector's sum and distorts the ranking; per-dimension scales weight
each dimension by 1/scale_d^2 in code space. `benchmarks/quantization.py` measures all three on
real data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

CALIBRATION_VERSION = 1
INT8_MAX = 127
Int8Scheme = Literal["global", "per-dim"]


@dataclass(frozen=True)
class Int8Calibration:
    """Scale(s) that map float embeddings to int8 codes.

    scheme: "global" (one scale) or "per-dim" (one per dimension).
    scale: the absolute value that maps to 127: length 1 for global, `dimension` for per-dim.
    quantile: quantile of |x| the scale was read at (1.0 = max); values beyond it are clipped.
    sample_size: number of vectors it was fitted on.
    """

    scheme: Int8Scheme
    scale: tuple[float, ...]
    quantile: float
    sample_size: int
    dimension: int
    version: int = CALIBRATION_VERSION

    def _scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, d) -> int8 (n, d), clipped to [-127, 127]."""
        if x.ndim != 2 or x.shape[1] != self.dimension:
            raise ValueError(f"quantize: expected shape (n, {self.dimension}), got {x.shape}")
        codes = np.rint(x / self._scale_array() * INT8_MAX)
        return np.clip(codes, -INT8_MAX, INT8_MAX).astype(np.int8)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """int8 (n, d) -> float32 (n, d), the approximation of the original vectors."""
        return codes.astype(np.float32) * (self._scale_array() / INT8_MAX)

    def clipped_fraction(self, x: np.ndarray) -> float:
        """Share of values in x (n, d) whose magnitude lies beyond the scale (clipped)."""
        if x.size == 0:
            return 0.0
        return float(np.mean(np.abs(x) > self._scale_array()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Int8Calibration:
        data = json.loads(text)
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"int8 calibration: expected version {CALIBRATION_VERSION}, got {data.get('version')!r}")
        data["scale"] = tuple(float(s) for s in data["scale"])
        return cls(**data)


def fit_int8(sample: np.ndarray, scheme: Int8Scheme = "global", quantile: float = 0.9999) -> Int8Calibration:
    """Fit scales on a sample of embeddings, float32 (n, d). Done once per collection."""
    if sample.ndim != 2 or sample.shape[0] == 0:
        raise ValueError(f"fit_int8: expected a non-empty (n, d) sample, got shape {sample.shape}")
    magnitudes = np.abs(sample.astype(np.float32))
    if scheme == "global":
        scale = np.atleast_1d(np.quantile(magnitudes, quantile))
    elif scheme == "per-dim":
        scale = np.quantile(magnitudes, quantile, axis=0)
    else:
        raise ValueError(f"fit_int8: scheme must be 'global' or 'per-dim', got {scheme!r}")
    scale = np.maximum(scale, np.finfo(np.float32).tiny)  # a dead dimension must not divide by 0
    return Int8Calibration(
        scheme=scheme,
        scale=tuple(float(s) for s in scale),
        quantile=quantile,
        sample_size=int(sample.shape[0]),
        dimension=int(sample.shape[1]),
    )


def binarize(x: np.ndarray) -> np.ndarray:
    """float32 (n, d) -> packed uint8 (n, d/8): bit = 1 where x > 0 (sign codes for Hamming search)."""
    if x.shape[1] % 8:
        raise ValueError(f"binarize: dimension must be a multiple of 8, got {x.shape[1]}")
    return np.packbits(x > 0, axis=1)
