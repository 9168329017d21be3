"""The CPU int8 backend against torch: docs/s and retained nDCG@10, side by side in one run.

Beside the flow, not in it: both backends embed the same BEIR corpus (the job's own text per
document, `Embedder` as the job builds it: one thread, CPU) and the same queries; each is then
searched exactly in memory and scored with reembed.metrics, the evaluation harness's metrics.
Throughput is the documents' embedding time alone (the model is loaded and, for onnx, exported
before the clock starts); the two backends alternate in `--rounds` rounds so that a noisy
neighbour on a shared machine hits both alike, and each reports its best round.

    python benchmarks/cpu_backend.py [--beir DIR] [--docs N] [--rounds 1] [--json OUT]

Prints one JSON object on stdout. Targets (issue 7): onnx-int8 >= 1.5x torch docs/s, >= 99 % of
torch's nDCG@10.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

from reembed.config import DEFAULT_MODEL
from reembed.documents import C_ID, C_REJECT, C_TEXT, DocumentSpec, normalize_record
from reembed.embedder import Embedder, resolve_model
from reembed.metrics import evaluate, exact_search, load_beir

logger = logging.getLogger("benchmarks.cpu_backend")
DEFAULT_BEIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cranfield"
TOP_K = 10
TARGET_SPEEDUP = 1.5
TARGET_NDCG_RATIO = 0.99


def job_texts(corpus: dict[str, dict], source: str) -> tuple[list[str], list[str]]:
    """(ids, texts) as the backfill job would embed them; rejects are left out."""
    spec = DocumentSpec()
    ids, texts = [], []
    for record in corpus.values():
        row = normalize_record(record, source, "", spec)
        if not row[C_REJECT]:
            ids.append(row[C_ID])
            texts.append(row[C_TEXT])
    return ids, texts


def time_encode(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    vectors = embedder.encode_documents(texts)
    return vectors, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    corpus, queries, qrels = load_beir(args.beir)
    doc_ids, texts = job_texts(corpus, str(Path(args.beir) / "corpus.jsonl"))
    judged = [q for q in qrels if q in queries]
    qrels = {q: qrels[q] for q in judged}
    source = resolve_model(args.model)
    embedders = {
        "torch": Embedder(source, device="cpu", threads=1, batch_size=args.batch_size),
        "onnx-int8": Embedder(source, device="cpu", threads=1, backend="onnx"),
    }
    timed = texts[: args.docs] if args.docs else texts
    model = embedders["torch"]
    tokens = sum(
        len(ids) for ids in model.model.tokenizer(timed, truncation=True, max_length=model.max_seq_length)["input_ids"]
    )
    best: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, embedder in embedders.items():
            embedder.encode_documents(timed[:2])  # warm-up: first-call allocations
            v, seconds = time_encode(embedder, timed)
            best[name] = min(best.get(name, float("inf")), seconds)
            vectors[name] = v
    results: dict[str, dict] = {}
    for name, embedder in embedders.items():
        docs = vectors[name] if len(timed) == len(texts) else embedder.encode_documents(texts)
        found = exact_search(embedder.encode_queries([queries[q] for q in judged]), docs, TOP_K)
        run_k = {q: [doc_ids[i] for i in row] for q, row in zip(judged, found.tolist(), strict=True)}
        metrics = evaluate(run_k, qrels, ks=(TOP_K,))
        results[name] = {
            "docs_per_s": round(len(timed) / best[name], 2),
            "tokens_per_s": round(tokens / best[name], 1),
            "seconds": round(best[name], 3),
            "batch_size": embedder.batch_size,
            "dtype": embedder.dtype,
            f"ndcg@{TOP_K}": round(metrics[f"ndcg@{TOP_K}"], 4),
        }
    cosine = (vectors["torch"] * vectors["onnx-int8"]).sum(axis=1)
    speedup = results["onnx-int8"]["docs_per_s"] / results["torch"]["docs_per_s"]
    ndcg_ratio = results["onnx-int8"][f"ndcg@{TOP_K}"] / results["torch"][f"ndcg@{TOP_K}"]
    return {
        "benchmark": "cpu_backend",
        "beir": str(args.beir),
        "model": source.name,
        "documents_timed": len(timed),
        "documents_searched": len(texts),
        "queries": len(judged),
        "mean_tokens": round(tokens / len(timed), 1),
        "rounds": args.rounds,
        "threads": 1,
        "cpu": f"{platform.processor() or platform.machine()}",
        "backends": results,
        "speedup": round(speedup, 3),
        f"ndcg@{TOP_K}_ratio": round(ndcg_ratio, 4),
        "cosine_to_torch": {"min": round(float(cosine.min()), 4), "mean": round(float(cosine.mean()), 4)},
        "targets": {
            "speedup": TARGET_SPEEDUP,
            f"ndcg@{TOP_K}_ratio": TARGET_NDCG_RATIO,
            "speedup_met": speedup >= TARGET_SPEEDUP,
            "ndcg_met": ndcg_ratio >= TARGET_NDCG_RATIO,
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beir", default=str(DEFAULT_BEIR), help="BEIR folder (default ../shared/data/cranfield)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=int, default=32, help="torch batch size (onnx runs one text at a time)")
    p.add_argument("--docs", type=int, default=0, help="documents timed (default all; nDCG always uses all)")
    p.add_argument("--rounds", type=int, default=1, help="alternating timing rounds; the best of each counts")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = run(args)
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
