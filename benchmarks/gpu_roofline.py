"""The embedder's compute against the device's peak: docs/s, tokens/s and the share of the roofline.

Beside the flow, not in it. It runs `Embedder.encode_documents_counted`, the call the job's
actors make (length buckets, the job's dtype), on Cranfield abstracts repeated to `--docs`, and
counts the FLOPs the model did on the padded token positions it computed:

    FLOPs per token ~= 2 x (parameters outside the embedding tables)      (the dense layers)
                      + 4 x layers x padded length x hidden                 (attention scores and sum)

For all-MiniLM-L6-v2 at 187 tokens that is about 22 MFLOP a token, the figure issue 7 uses. The
share is achieved FLOP/s over the device's dense peak for the dtype: known for common GPUs by name
(table below, dense, no sparsity), or `--peak-tflops`. Target (issue 7): >= 25 % of the bf16 peak
on a GPU. On a CPU it runs too (`--device cpu`), reporting FLOP/s and a share only if given a peak.

    python benchmarks/gpu_roofline.py --dtype bfloat16 --docs 20000 --batch-size auto
    python benchmarks/gpu_roofline.py --device cpu --docs 200          # a quick check anywhere

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from cpu_backend import job_texts  # the job's own text per document

from reembed.config import DEFAULT_MODEL
from reembed.embedder import Embedder, resolve_model

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cranfield" / "corpus.jsonl"
TARGET_SHARE = 0.25
# Dense (no sparsity) peak TFLOP/s by device-name substring and dtype, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3},
    "A10": {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2},
    "T4": {"float16": 65.0, "float32": 8.1},
}


def flop_model(model) -> tuple[float, float]:
    """(dense FLOPs per token, attention FLOPs per token per padded position) of a sentence-transformers model."""
    auto = model[0].auto_model
    embed_params = sum(p.numel() for name, p in auto.named_parameters() if "embeddings" in name)
    dense_params = sum(p.numel() for p in auto.parameters()) - embed_params
    cfg = auto.config
    return 2.0 * dense_params, 4.0 * cfg.num_hidden_layers * cfg.hidden_size


def peak_for(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="bfloat16")
    p.add_argument("--batch-size", default="auto", help="texts per forward pass, or auto (the job's probe)")
    p.add_argument("--docs", type=int, default=20_000, help="documents embedded (the corpus repeats)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for the dtype")
    args = p.parse_args(argv)

    records = [json.loads(line) for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    _, texts = job_texts({str(i): r for i, r in enumerate(records)}, args.corpus)
    docs = [texts[i % len(texts)] for i in range(args.docs)]
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    embedder = Embedder(resolve_model(args.model), device=args.device, threads=None, batch_size=batch, dtype=args.dtype)
    embedder.encode_documents(docs[: min(len(docs), 256)])  # warm-up (and the batch-size probe)

    import torch

    cuda = embedder.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = embedder.encode_documents_counted(docs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens, padded = int(out.tokens.sum()), int(out.padded.sum())
    # Attention grows with each text's own padded length: per text, (dense + attn x length) x length.
    dense, attn = flop_model(embedder.model)
    lengths = out.padded.astype(np.float64)
    flops = float(((dense + attn * lengths) * lengths).sum())
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or peak_for(device_name, embedder.dtype)
    achieved = flops / seconds / 1e12
    share = achieved / peak if peak else None
    result = {
        "benchmark": "gpu_roofline",
        "model": embedder.source.name,
        "device": device_name,
        "dtype": embedder.dtype,
        "batch_size": embedder.batch_size,
        "documents": len(docs),
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(docs) / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "padded_tokens_per_s": round(padded / seconds, 1),
        "padding_ratio": round((padded - tokens) / padded, 4) if padded else 0.0,
        "mflop_per_token": round(flops / padded / 1e6, 2) if padded else None,
        "achieved_tflops": round(achieved, 3),
        "peak_tflops": peak,
        "roofline_share": round(share, 4) if share is not None else None,
        "target_share": TARGET_SHARE,
        "met": (share >= TARGET_SHARE) if share is not None and cuda else None,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
