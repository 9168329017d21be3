"""--dtype, --actors-per-gpu and --backend: validation before any work, Ray resource arithmetic, identity."""

import json

import pytest

from jobs.backfill import parse_config
from jobs.pipeline import gpu_share, plan_compute
from reembed.config import BackfillConfig, load_settings
from reembed.embedder import ModelIdentity, resolve_dtype
from reembed.errors import ConfigError
from reembed.store import CollectionIdentity


def config(tmp_path, **flags) -> BackfillConfig:
    return load_settings(BackfillConfig, {"input": str(tmp_path), **flags})


def test_defaults_are_what_the_job_did_before(tmp_path):
    cfg = config(tmp_path)
    assert (cfg.dtype, cfg.backend, cfg.actors_per_gpu, cfg.batch_size) == ("auto", "torch", 1, 64)
    flags = parse_config(["--input", str(tmp_path), "--dtype", "bfloat16", "--actors-per-gpu", "3"])
    assert (flags.dtype, flags.actors_per_gpu) == ("bfloat16", 3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": "float16", "device": "cpu"}, "dtype: float16 on the CPU"),
        ({"actors_per_gpu": 0}, "actors_per_gpu"),
        ({"actors_per_gpu": 65}, "actors_per_gpu"),
        ({"actors_per_gpu": 2, "device": "cpu"}, "actors_per_gpu: shares a GPU"),
        ({"backend": "tensorrt"}, "backend"),
    ],
)
def test_bad_values_fail_at_config_load(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **flags)


def test_dtype_auto_is_fp16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_dtype("auto", "cuda") == "float16" and resolve_dtype("auto", "cuda:1") == "float16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float32", "cuda") == "float32"
    with pytest.raises(ConfigError, match="float16 on the CPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("int4", "cuda")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 8, 64])
def test_gpu_share_lets_n_actors_fit_on_one_gpu(n):
    share = gpu_share(n)
    assert share * n <= 1.0 and share > 1.0 / n - 1e-4
    assert round(share, 4) == share  # Ray's resource granularity


def test_actors_per_gpu_multiplies_actors_and_divides_the_gpu():
    plan = plan_compute(None, "auto", 256, 2, 512, None, shape=(32.0, 4, 2), actors_per_gpu=3)
    assert (plan.actors, plan.gpus_per_actor, plan.device, plan.dtype) == (12, 0.3333, "cuda", "float16")
    assert plan.actors * plan.gpus_per_actor <= 4
    one = plan_compute(None, "auto", 256, 2, 512, None, shape=(32.0, 4, 2))
    assert (one.actors, one.gpus_per_actor, one.dtype) == (4, 1.0, "float16")  # as before
    bf16 = plan_compute(2, "cuda", 256, 2, 512, None, shape=(32.0, 4, 2), actors_per_gpu=2, dtype="bfloat16")
    assert (bf16.actors, bf16.gpus_per_actor, bf16.dtype) == (2, 0.5, "bfloat16")  # --actors wins
    cpu = plan_compute(None, "auto", 64, 1, 512, None, shape=(4.0, 0, 1))
    assert (cpu.device, cpu.dtype, cpu.gpus_per_actor) == ("cpu", "float32", 0.0)


def test_a_cpu_backend_never_takes_a_gpu():
    plan = plan_compute(None, "auto", 64, 1, 512, None, shape=(8.0, 2, 1), backend="onnx")
    assert (plan.device, plan.gpus_per_actor, plan.backend, plan.dtype) == ("cpu", 0.0, "onnx", "float32")


def model_identity(**kw) -> ModelIdentity:
    return ModelIdentity("m", "r", "abc", 384, 256, **kw)


def test_default_torch_float32_identity_is_unchanged():
    # What a collection made before --dtype/--backend existed carries, byte for byte.
    before = {"name": "m", "revision": "r", "weights_sha256": "abc", "dimension": 384, "max_seq_length": 256}
    assert model_identity().to_dict() == {**before, "normalize": True}
    assert json.dumps(model_identity().to_dict(), sort_keys=True) == json.dumps(
        {**before, "normalize": True}, sort_keys=True
    )
    assert model_identity(dtype="bfloat16").to_dict()["dtype"] == "bfloat16"
    assert model_identity(backend="onnx").to_dict()["backend"] == "onnx"


def collection(model: ModelIdentity) -> CollectionIdentity:
    return CollectionIdentity(
        model=model.to_dict(),
        precision="int8",
        vector_type="FLOAT_VECTOR",
        calibration=None,
        partitioning={"scheme": "hash", "partitions": 1},
    )


def test_backend_must_match_and_dtype_is_recorded_only():
    old = collection(model_identity())
    assert old.differences(collection(model_identity())) == []
    # fp16 on a GPU writes into a collection made in fp32 on the CPU (and back): same function, rounding apart.
    assert old.differences(collection(model_identity(dtype="float16"))) == []
    diffs = old.differences(collection(model_identity(backend="onnx")))
    assert diffs == ["model.backend: collection has 'torch', this run has 'onnx'"]


def test_bfloat16_embeds_close_to_float32_and_says_so_in_its_identity():

    from reembed.embedder import Embedder, resolve_model

    source = resolve_model("all-MiniLM-L6-v2")
    texts = ["lift of a swept wing at high angles of attack", "heat transfer in a laminar boundary layer"]
    fp32 = Embedder(source, device="cpu", dtype="auto")
    bf16 = Embedder(source, device="cpu", dtype="bfloat16")
    cos = (fp32.encode_documents(texts) * bf16.encode_documents(texts)).sum(axis=1)
    assert cos.min() > 0.99
    assert "dtype" not in fp32.identity().to_dict() and bf16.identity().dtype == "bfloat16"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"backend": "openvino"}, "openvino' is not available in this build"),
        ({"backend": "onnx", "device": "cuda"}, "CPU int8 backend"),
        ({"backend": "onnx", "dtype": "bfloat16"}, "int8 weights"),
        ({"backend": "onnx", "actors_per_gpu": 2}, "actors_per_gpu"),
    ],
)
def test_cpu_backend_combinations_that_cannot_run_fail_at_config_load(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **flags)


def test_missing_onnxruntime_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r"reembed\[onnx\]"):
        config(tmp_path, backend="onnx")


def test_service_loads_the_collections_backend():
    from reembed.search import model_key

    base = {"name": "m", "weights_sha256": "a" * 64, "dimension": 384}
    assert model_key(base) == f"m@{'a' * 16}/384"  # unchanged for torch collections
    assert model_key({**base, "backend": "onnx"}).endswith("/onnx")
