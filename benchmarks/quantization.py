"""How much retrieval quality each vector encoding keeps, side by side, on one BEIR test set.

Beside the flow, not in it: it embeds a corpus the way the backfill job does (the same
`normalize_record` text, the same `Embedder`), then searches the test queries exactly in memory
under each encoding, in one run, against float32 as the reference:

- float32: inner product of unit vectors (cosine), 4 bytes a dimension;
- int8-global: one symmetric scale, searched in code space (the integer inner product of query
  codes and document codes, which is what Milvus ranks int8 vectors by): the project's default;
- int8-per-dim: one symmetric scale per dimension, code space;
- int8-minmax: per-dimension min-max with a zero point (asymmetric affine, as
  sentence-transformers' `quantize_embeddings(precision="int8")` does), code space: the
  distortion the project avoids;
- binary: sign bits, Hamming distance;
- binary+rescore: the top k * multiplier by Hamming re-ranked by the float32 inner product (of the
  float query with the float documents: an upper bound for re-ranking with stored vectors).

Int8 is calibrated on the first `--calibration-sample` documents only, like the job; the share of
values clipped is then measured on all documents. Every cutoff k gets its own search at depth k,
so binary+rescore at @10 re-ranks 10 * multiplier candidates and at @100, 100 * multiplier.

    python benchmarks/quantization.py [--beir DIR] [--calibration-sample 1024] [--json OUT]

Prints a readable table on stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reembed.config import DEFAULT_MODEL, BackfillConfig
from reembed.documents import C_ID, C_REJECT, C_TEXT, DocumentSpec, normalize_record
from reembed.embedder import Embedder, resolve_model
from reembed.metrics import evaluate, exact_search, hamming_search, load_beir, rescore, top_k_agreement
from reembed.quantize import binarize, fit_int8

logger = logging.getLogger("benchmarks.quantization")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BEIR = Path(os.environ.get("REEMBED_CRANFIELD", REPO.parent / "shared" / "data" / "cranfield"))
TOP_K = 10
DEPTH = 100
KS = (TOP_K, DEPTH)
TABLE_METRICS = (f"ndcg@{TOP_K}", f"recall@{TOP_K}", f"recall@{DEPTH}", f"mrr@{TOP_K}")
REFERENCE = "float32"


@dataclass(frozen=True)
class Mode:
    """One encoding: how to search it at depth k, and what a stored vector costs."""

    name: str
    description: str
    bytes_per_vector: int
    search: Callable[[int], np.ndarray]  # k -> document indices (n_queries, k), best first
    clipped_fraction: float | None = None


@dataclass(frozen=True)
class MinMaxCalibration:
    """Per-dimension affine int8: code = round((x - low) / step) - 128, clipped to [-128, 127]."""

    low: np.ndarray  # float32 (d,)
    high: np.ndarray  # float32 (d,)

    @classmethod
    def fit(cls, sample: np.ndarray) -> MinMaxCalibration:
        return cls(low=sample.min(axis=0), high=sample.max(axis=0))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, d) -> int8 (n, d)."""
        step = np.maximum(self.high - self.low, np.finfo(np.float32).tiny) / 255.0
        codes = np.rint((x - self.low) / step) - 128
        return np.clip(codes, -128, 127).astype(np.int8)

    def clipped_fraction(self, x: np.ndarray) -> float:
        return float(np.mean((x < self.low) | (x > self.high)))


def read_documents(corpus: dict[str, dict], source: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of the documents the job would embed, with the job's text; rejects are logged."""
    spec = DocumentSpec()
    ids, texts = [], []
    for record in corpus.values():
        row = normalize_record(record, source, "", spec)
        if row[C_REJECT]:
            logger.warning("document %r rejected, as the job would: %s", record.get("_id"), row[C_REJECT])
            continue
        ids.append(row[C_ID])
        texts.append(row[C_TEXT])
    return ids, texts


def build_modes(
    q_float: np.ndarray, d_float: np.ndarray, calibration_sample: int, quantile: float, multiplier: int
) -> list[Mode]:
    dim = d_float.shape[1]
    sample = d_float[:calibration_sample]
    modes = [Mode(REFERENCE, "inner product of unit vectors", 4 * dim, lambda k: exact_search(q_float, d_float, k))]

    for scheme, description in (
        ("global", "symmetric int8, one scale, code-space inner product (project default)"),
        ("per-dim", "symmetric int8, a scale per dimension, code-space inner product"),
    ):
        calibration = fit_int8(sample, scheme, quantile)
        q_codes, d_codes = calibration.quantize(q_float), calibration.quantize(d_float)
        modes.append(
            Mode(
                f"int8-{scheme}",
                description,
                dim,
                lambda k, q=q_codes, d=d_codes: exact_search(q, d, k),
                calibration.clipped_fraction(d_float),
            )
        )

    minmax = MinMaxCalibration.fit(sample)
    q_mm, d_mm = minmax.quantize(q_float), minmax.quantize(d_float)
    modes.append(
        Mode(
            "int8-minmax",
            "per-dimension min-max with a zero point, code-space inner product",
            dim,
            lambda k: exact_search(q_mm, d_mm, k),
            minmax.clipped_fraction(d_float),
        )
    )

    q_bits, d_bits = binarize(q_float), binarize(d_float)
    modes.append(Mode("binary", "sign bits, Hamming distance", dim // 8, lambda k: hamming_search(q_bits, d_bits, k)))
    modes.append(
        Mode(
            "binary+rescore",
            f"Hamming top k*{multiplier}, re-ranked by float32 inner product (float vectors read for candidates)",
            dim // 8,
            lambda k: rescore(q_float, d_float, hamming_search(q_bits, d_bits, k * multiplier), k),
        )
    )
    return modes


def format_table(report: dict) -> str:
    header = ["mode", *TABLE_METRICS, f"ndcg@{TOP_K}/f32", "bytes", f"top{TOP_K}=f32", f"top{TOP_K}∩f32", "clipped"]
    rows = [header]
    for name, m in report["modes"].items():
        clipped = "" if m["clipped_fraction"] is None else f"{m['clipped_fraction']:.2e}"
        rows.append(
            [
                name,
                *(f"{m[key]:.4f}" for key in TABLE_METRICS),
                "" if m[f"ndcg@{TOP_K}_ratio"] is None else f"{m[f'ndcg@{TOP_K}_ratio']:.4f}",
                str(m["bytes_per_vector"]),
                f"{m[f'top{TOP_K}_same_as_float32']:.3f}",
                f"{m[f'top{TOP_K}_overlap_with_float32']:.3f}",
                clipped,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    d = report["data"]
    lines.insert(
        0,
        f"{d['name']}: {d['documents']} documents, {d['queries']} judged queries; {report['model']['name']} "
        f"(d={report['model']['dimension']}); int8 fitted on the first {report['calibration']['sample']} documents "
        f"at quantile {report['calibration']['quantile']}",
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    corpus, queries, qrels = load_beir(args.beir)
    doc_ids, doc_texts = read_documents(corpus, str(Path(args.beir) / "corpus.jsonl"))
    judged = [qid for qid in qrels if qid in queries]
    if len(judged) < len(qrels):
        logger.warning("%d judged queries have no text in queries.jsonl: left out", len(qrels) - len(judged))
    qrels = {qid: qrels[qid] for qid in judged}
    unknown = {d for rels in qrels.values() for d in rels} - set(doc_ids)
    if unknown:
        logger.warning("%d judged documents are not in the embedded corpus: they count as never found", len(unknown))

    source = resolve_model(args.model)
    embedder = Embedder(source, device=args.device, threads=args.threads, batch_size=args.batch_size)
    t0 = time.perf_counter()
    d_float = embedder.encode_documents(doc_texts)
    t1 = time.perf_counter()
    q_float = embedder.encode_queries([queries[qid] for qid in judged])
    t2 = time.perf_counter()
    logger.info("embedded %d documents in %.1f s, %d queries in %.1f s", len(doc_ids), t1 - t0, len(judged), t2 - t1)

    sample_size = min(args.calibration_sample, len(doc_ids))
    modes = build_modes(q_float, d_float, sample_size, args.calibration_quantile, args.rescore_multiplier)

    results: dict[str, dict] = {}
    top: dict[str, np.ndarray] = {}
    search_s: dict[str, float] = {}
    reference_ndcg = 0.0
    for mode in modes:
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        for k in KS:
            found = mode.search(k)
            if k == TOP_K:
                top[mode.name] = found
            run_k = {qid: [doc_ids[i] for i in row] for qid, row in zip(judged, found.tolist(), strict=True)}
            metrics.update(evaluate(run_k, qrels, ks=(k,)))
        search_s[mode.name] = round(time.perf_counter() - start, 3)
        same, overlap = top_k_agreement(top[mode.name], top[REFERENCE])
        if mode.name == REFERENCE:  # built first, so every later mode has its ratio
            reference_ndcg = metrics[f"ndcg@{TOP_K}"]
        results[mode.name] = {
            **{key: round(v, 4) for key, v in metrics.items()},
            f"ndcg@{TOP_K}_ratio": round(metrics[f"ndcg@{TOP_K}"] / reference_ndcg, 4) if reference_ndcg else None,
            "bytes_per_vector": mode.bytes_per_vector,
            f"top{TOP_K}_same_as_float32": round(same, 4),
            f"top{TOP_K}_overlap_with_float32": round(overlap, 4),
            "clipped_fraction": mode.clipped_fraction,
            "description": mode.description,
        }

    return {
        "benchmark": "quantization",
        "data": {"name": Path(args.beir).name, "documents": len(doc_ids), "queries": len(judged)},
        "model": {"name": source.name, "revision": source.revision, "dimension": embedder.dimension},
        "calibration": {"sample": sample_size, "quantile": args.calibration_quantile, "clipped_on": "all documents"},
        "rescore_multiplier": args.rescore_multiplier,
        "timings_s": {
            "embed_documents": round(t1 - t0, 2),
            "embed_queries": round(t2 - t1, 2),
            "search_and_score": search_s,
        },
        "modes": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = BackfillConfig.model_fields
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beir", type=Path, default=DEFAULT_BEIR, help="BEIR folder (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    p.add_argument(
        "--calibration-sample",
        type=int,
        default=defaults["calibration_sample"].default,
        help="fit int8 on the first N documents only, as the job does (default: %(default)s)",
    )
    p.add_argument("--calibration-quantile", type=float, default=defaults["calibration_quantile"].default)
    p.add_argument("--rescore-multiplier", type=int, default=4, help="binary+rescore re-ranks the top k * this")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    if args.calibration_sample < 1 or args.rescore_multiplier < 1:
        p.error("--calibration-sample and --rescore-multiplier must be >= 1")
    if not (args.beir / "corpus.jsonl").exists():
        p.error(f"--beir: no corpus.jsonl under {str(args.beir)!r}; point it at a BEIR folder or set REEMBED_CRANFIELD")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = run(args)
    print(format_table(report), file=sys.stderr)
    text = json.dumps(report, separators=(",", ":"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
