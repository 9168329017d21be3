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

The scale clips about (1 - quantile) of the sample's values by construction. Documents added
later are checked against it (`clipping_report`): when clipping on them is several times that,
their distribution has drifted from the sample and the job's summary flags it.

Binary codes (sign bits) are searched by Hamming distance and re-ranked with float16 copies of
the vectors (`encode_rerank_vectors`), kept as base64 text beside the codes: Milvus 2.3 allows one
vector field per collection and has no bytes field.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

CALIBRATION_VERSION = 1
INT8_MAX = 127
Int8Scheme = Literal["global", "per-dim"]
# New documents may clip this many times the share the sample clipped by construction
# (1 - quantile), and at least CLIP_DRIFT_FLOOR, before the calibration is flagged as drifted.
CLIP_DRIFT_FACTOR = 10.0
CLIP_DRIFT_FLOOR = 1e-3
RERANK_ENCODING = "float16-base64"


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

    def clipped_per_row(self, x: np.ndarray) -> np.ndarray:
        """Number of clipped values in each row of x (n, d): int32 (n,)."""
        return np.count_nonzero(np.abs(x) > self._scale_array(), axis=1).astype(np.int32)

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


def clip_drift_threshold(quantile: float) -> float:
    """Share of clipped values on new documents above which the calibration no longer fits them."""
    return max(CLIP_DRIFT_FACTOR * (1.0 - quantile), CLIP_DRIFT_FLOOR)


def clipping_report(calibration: Int8Calibration, documents: int, clipped_values: int) -> dict[str, Any]:
    """How well a calibration fits `documents` documents embedded after it, with `clipped_values`
    values clipped among their documents * dimension values. `drift` is True when clipping is common
    (above `clip_drift_threshold`): re-fit the scale on recent documents (a new collection)."""
    values = documents * calibration.dimension
    fraction = clipped_values / values if values else 0.0
    threshold = clip_drift_threshold(calibration.quantile)
    return {
        "calibration_sample_size": calibration.sample_size,
        "calibration_quantile": calibration.quantile,
        "documents": documents,
        "values": values,
        "clipped_values": clipped_values,
        "clipped_fraction": fraction,
        "drift_threshold": threshold,
        "drift": fraction > threshold,
    }


def encode_rerank_vectors(x: np.ndarray) -> list[str]:
    """float32 (n, d) -> n ASCII strings: each row as little-endian float16, base64 (re-rank copies)."""
    half = np.ascontiguousarray(x, dtype="<f2")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in half]


def decode_rerank_vectors(texts: Sequence[str], dimension: int) -> np.ndarray:
    """The inverse of `encode_rerank_vectors`: float32 (len(texts), dimension)."""
    out = np.empty((len(texts), dimension), dtype=np.float32)
    for i, text in enumerate(texts):
        row = np.frombuffer(base64.b64decode(text), dtype="<f2")
        if row.shape[0] != dimension:
            raise ValueError(f"re-rank vector {i}: expected {dimension} float16 values, got {row.shape[0]}")
        out[i] = row
    return out


def rerank_text_bytes(dimension: int) -> int:
    """Bytes one re-rank vector takes as stored: base64 of 2 * dimension bytes."""
    return 4 * math.ceil(2 * dimension / 3)


def binarize(x: np.ndarray) -> np.ndarray:
    """float32 (n, d) -> packed uint8 (n, d/8): bit = 1 where x > 0 (sign codes for Hamming search)."""
    if x.shape[1] % 8:
        raise ValueError(f"binarize: dimension must be a multiple of 8, got {x.shape[1]}")
    return np.packbits(x > 0, axis=1)
