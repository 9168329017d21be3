import numpy as np
import pytest

from reembed.quantize import (
    Int8Calibration,
    binarize,
    clip_drift_threshold,
    clipping_report,
    decode_rerank_vectors,
    encode_rerank_vectors,
    fit_int8,
    rerank_text_bytes,
)


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


def test_clipped_per_row_counts_values_beyond_the_scale():
    cal = Int8Calibration(scheme="global", scale=(0.5,), quantile=0.9999, sample_size=1, dimension=4)
    x = np.array([[0.6, 0.1, -0.7, 0.5], [0.1, 0.1, 0.1, 0.1]], dtype=np.float32)
    # row 0: |0.6| and |-0.7| exceed 0.5 (0.5 itself maps to 127, not clipped) -> 2; row 1 -> 0
    assert cal.clipped_per_row(x).tolist() == [2, 0]


def test_drift_threshold_is_ten_times_what_the_sample_clips_with_a_floor():
    assert clip_drift_threshold(0.99) == pytest.approx(0.1)  # 10 * 1%
    assert clip_drift_threshold(0.9999) == pytest.approx(1e-3)  # 10 * 0.01% = the floor
    assert clip_drift_threshold(1.0) == pytest.approx(1e-3)  # the max clips nothing: floor


def test_clipping_report_flags_drift():
    cal = Int8Calibration(scheme="global", scale=(0.5,), quantile=0.9999, sample_size=100, dimension=4)
    # 10 documents * 4 values = 40; none clipped: no drift
    calm = clipping_report(cal, documents=10, clipped_values=0)
    assert calm["values"] == 40 and calm["clipped_fraction"] == 0.0 and calm["drift"] is False
    # 1 of 40 = 0.025 > 1e-3: drift
    drifted = clipping_report(cal, documents=10, clipped_values=1)
    assert drifted["clipped_fraction"] == pytest.approx(0.025) and drifted["drift"] is True
    assert drifted["calibration_sample_size"] == 100 and drifted["drift_threshold"] == pytest.approx(1e-3)
    assert clipping_report(cal, documents=0, clipped_values=0)["drift"] is False


def test_rerank_copies_roundtrip_as_float16_text():
    x = unit_rows(3, 384, 5)
    texts = encode_rerank_vectors(x)
    # 384 float16 = 768 bytes -> base64 4 * ceil(768 / 3) = 1024 ASCII characters
    assert all(len(t) == 1024 == rerank_text_bytes(384) and t.isascii() for t in texts)
    back = decode_rerank_vectors(texts, 384)
    assert back.dtype == np.float32 and back.shape == (3, 384)
    np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))
    assert np.abs(back - x).max() < 1e-3  # float16 keeps ~3 decimal digits of unit-vector components
    with pytest.raises(ValueError, match="expected 16 float16 values, got 384"):
        decode_rerank_vectors(texts[:1], 16)
