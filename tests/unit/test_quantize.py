import numpy as np
import pytest

from reembed.quantize import Int8Calibration, binarize, fit_int8


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_global_codes_are_symmetric_and_clipped():
    cal = Int8Calibration(scheme="global", scale=(0.5,), quantile=1.0, sample_size=1, dimension=4)
    codes = cal.quantize(np.array([[0.5, -0.5, 0.25, 2.0]], dtype=np.float32))
    assert codes.dtype == np.int8
    # 0.5/0.5*127 = 127; -127 (no -128: symmetric); 0.25 -> 63.5 -> 64 (round half to even gives 64); 2.0 clips.
    assert codes.tolist() == [[127, -127, 64, 127]]
    assert cal.clipped_fraction(np.array([[0.5, 0.6, -0.7, 0.1]], dtype=np.float32)) == 0.5


def test_fit_uses_quantile_and_roundtrips_through_json():
    sample = unit_rows(500, 32)
    cal = fit_int8(sample, "global", quantile=1.0)
    assert cal.scale[0] == pytest.approx(float(np.abs(sample).max()))
    again = Int8Calibration.from_json(cal.to_json())
    assert again == cal
    per_dim = fit_int8(sample, "per-dim", quantile=0.99)
    assert len(per_dim.scale) == 32 and per_dim.sample_size == 500
    with pytest.raises(ValueError, match="version"):
        Int8Calibration.from_json(cal.to_json().replace('"version":1', '"version":99'))


def test_code_space_inner_product_keeps_float_ranking():
    docs, queries = unit_rows(400, 64, 1), unit_rows(20, 64, 2)
    cal = fit_int8(docs, "global", quantile=1.0)
    exact = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    codes_q, codes_d = cal.quantize(queries).astype(np.int32), cal.quantize(docs).astype(np.int32)
    approx = np.argsort(-(codes_q @ codes_d.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx, strict=True)])
    assert overlap >= 0.95
    # Scores map back to cosines: (127/scale)^2 * <x, y> up to rounding.
    recovered = (codes_q[0] @ codes_d[0]) * (cal.scale[0] / 127) ** 2
    assert recovered == pytest.approx(float(queries[0] @ docs[0]), abs=0.02)


def test_quantize_rejects_wrong_dimension():
    cal = fit_int8(unit_rows(10, 8), "global")
    with pytest.raises(ValueError, match=r"expected shape \(n, 8\)"):
        cal.quantize(unit_rows(2, 16))


def test_binarize_packs_sign_bits():
    x = np.array([[1, -1, 0.5, -0.5, 0, 2, -2, 3]], dtype=np.float32)
    assert binarize(x).tolist() == [[0b10100101]]
