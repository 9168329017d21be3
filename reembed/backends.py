"""The CPU int8 backend: the model's transformer exported to ONNX, weights quantised to int8, run by onnxruntime.

Used by reembed/embedder.py for `--backend onnx`. Only the transformer runs in onnxruntime; the
tokenizer, pooling and normalisation stay the sentence-transformers modules the torch backend
uses, so a document and a query still go through one definition.

Why not sentence-transformers' own `backend="onnx"`: it loads through optimum-onnx, whose only
release needs transformers < 4.58, and this project runs transformers 5. The same two steps are
done here with torch's exporter and onnxruntime's quantiser (what optimum wraps): export the
float32 graph once, then `quantize_dynamic` with per-channel int8 weights on the weight MatMuls
only. Measured on all-MiniLM-L6-v2 (AVX2 CPU without VNNI): per-tensor int8 weights saturate
there and drop the cosine to the torch vectors to 0.89; quantising the attention's activation x
activation MatMuls too costs speed and accuracy. Per-channel weight-only: cosine >= 0.988.
Activations are quantised per tensor at run time, so the embedder runs one text at a time
(batch invariance, reembed/embedder.py).

The exported files are cached per model weights (REEMBED_ONNX_CACHE, default
~/.cache/reembed/onnx/<fingerprint>/) and written atomically, so concurrent actors may race to
export and the loser's file simply replaces an identical one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reembed import batching
from reembed.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

ONNX_CACHE_ENV = "REEMBED_ONNX_CACHE"
DEFAULT_ONNX_CACHE = "~/.cache/reembed/onnx"
# Recorded as the dtype of the model identity: int8 weights (per output channel), activations
# quantised per tensor at run time.
ONNX_INT8_DTYPE = "qint8-dynamic"
INT8_FILE = "model_qint8_per_channel.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17


def onnx_cache_dir(model_path: str | Path) -> Path:
    root = Path(os.environ.get(ONNX_CACHE_ENV) or DEFAULT_ONNX_CACHE).expanduser()
    return root / batching.weights_fingerprint(model_path)


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "backend: 'onnx' needs onnxruntime, which is not installed; pip install 'reembed[onnx]' "
            "or use --backend torch"
        ) from None
    return onnxruntime


def _atomic_target(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx")
    os.close(fd)
    return Path(tmp)


def export_int8_onnx(model: SentenceTransformer, out_dir: Path) -> Path:
    """Export `model`'s transformer to ONNX and quantise its weights to int8; returns the int8 file.

    Inputs input_ids, attention_mask (and token_type_ids where the model takes them), int64
    (batch, sequence); output token_embeddings, float32 (batch, sequence, hidden).
    """
    import torch

    onnxruntime = _require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    transformer = model[0]
    auto_model = getattr(transformer, "auto_model", None)
    if auto_model is None:
        raise ConfigError(f"backend: 'onnx' expects a transformer as the model's first module, got {transformer!r}")
    names = [n for n in INPUT_NAMES if n in model.tokenizer.model_input_names]

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # trace with padding, so that no all-ones mask shortcut is baked in
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    fp32 = _atomic_target(out_dir / "model_fp32.onnx")
    int8 = out_dir / INT8_FILE
    tmp8 = _atomic_target(int8)
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                TokenEmbeddings(auto_model.float().cpu().eval()),
                tuple(example[n] for n in names),
                str(fp32),
                input_names=names,
                output_names=["token_embeddings"],
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in (*names, "token_embeddings")},
                opset_version=OPSET,
                dynamo=False,
            )
        quantize_dynamic(
            fp32,
            tmp8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
        )
        os.replace(tmp8, int8)
    finally:
        for f in (fp32, tmp8):
            f.unlink(missing_ok=True)
    logger.info("exported %s (onnxruntime %s)", int8, onnxruntime.__version__)
    return int8


class OnnxInt8Transformer:
    """Runs the int8 transformer in onnxruntime and the model's own pooling modules after it.

    Called like `SentenceTransformer.forward`: features (torch tensors from the tokenizer) in,
    the same dict with `sentence_embedding` out.
    """

    def __init__(self, model: SentenceTransformer, model_path: str | Path, threads: int | None = 1) -> None:
        onnxruntime = _require_onnxruntime()
        path = onnx_cache_dir(model_path) / INT8_FILE
        if not path.is_file():
            path = export_int8_onnx(model, path.parent)
        options = onnxruntime.SessionOptions()
        # One thread per actor, as for torch: scale out with actors, keep results batch-invariant.
        options.intra_op_num_threads = threads or 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.after = list(model)[1:]  # pooling, normalisation, dense layers: the torch modules
        self.path = path

    def __call__(self, features: dict[str, Any]) -> dict[str, Any]:
        import torch

        feed = {n: features[n].cpu().numpy() for n in self.input_names}
        out = dict(features)
        out["token_embeddings"] = torch.from_numpy(self.session.run(None, feed)[0])
        for module in self.after:
            out = module(out)
        return out
