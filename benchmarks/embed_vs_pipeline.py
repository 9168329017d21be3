"""Embedding alone against embed + quantise + write, on the same documents, side by side in one run.

Beside the flow, not in it: the job's own per-batch steps (reembed.ingest.DocumentEncoder with the
int8 calibration, then BatchWriter upserting into Milvus Lite) against the bare
`Embedder.encode_documents` on the same blocks of rows. Both run serially in this one process,
so the ratio is a lower bound for the job, where writers are separate actors that overlap with
embedding. The two modes alternate in `--rounds` rounds (a noisy neighbour hits both alike) and
each reports its best round.

Documents: a long-tailed mix built from a BEIR corpus (Cranfield by default): titles alone
(short), abstracts, and concatenations of three abstracts (long: truncated at the model's 256
tokens), so that length bucketing and padding are exercised the way a real corpus would.

    python benchmarks/embed_vs_pipeline.py [--docs 480] [--rounds 2] [--json OUT]

Prints one JSON object on stdout. Target (issue 7): pipeline / embed-only >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reembed.config import DEFAULT_MODEL
from reembed.documents import DocumentSpec, normalize_json_lines, with_shard
from reembed.embedder import Embedder, padding_ratio, resolve_model
from reembed.ingest import C_PADDED, C_TOKENS, BatchWriter, DocumentEncoder
from reembed.metrics import load_beir
from reembed.quantize import fit_int8
from reembed.store import CollectionIdentity, MilvusStore

logger = logging.getLogger("benchmarks.embed_vs_pipeline")
DEFAULT_BEIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cranfield"
TARGET_RATIO = 0.9
COLLECTION = "bench"
MAX_TEXT_BYTES = 8192


def long_tailed_mix(corpus: dict[str, dict], n: int, seed: int = 0) -> list[dict]:
    """`n` records: 45 % titles alone, 40 % abstracts, 15 % three abstracts joined."""
    rng = np.random.default_rng(seed)
    records = [r for r in corpus.values() if (r.get("text") or "").strip()]
    out = []
    for i in range(n):
        pick = records[int(rng.integers(len(records)))]
        kind = rng.random()
        if kind < 0.45:
            text = pick.get("title") or pick["text"][:80]
        elif kind < 0.85:
            text = f"{pick.get('title', '')} {pick['text']}"
        else:
            parts = [records[int(j)] for j in rng.integers(len(records), size=3)]
            text = " ".join(f"{p.get('title', '')} {p['text']}" for p in parts)
        out.append({"_id": f"doc{i}", "text": text.strip()})
    return out


def as_batches(records: list[dict], rows: int) -> list[dict[str, np.ndarray]]:
    """Blocks of `rows` documents in the job's batch layout (what the read step hands on)."""
    spec = DocumentSpec(text_fields=("text",))
    batches = []
    for start in range(0, len(records), rows):
        lines = [json.dumps(r) for r in records[start : start + rows]]
        table = with_shard(normalize_json_lines(lines, ["mix.jsonl"] * len(lines), spec), f"mix#{start}")
        batches.append({k: np.array(v, dtype=object) for k, v in table.to_pydict().items()})
    return batches


def run(args: argparse.Namespace) -> dict:
    corpus, _, _ = load_beir(args.beir)
    records = long_tailed_mix(corpus, args.docs)
    batches = as_batches(records, args.batch_size)  # rows per call = batch size on CPUs (jobs/pipeline.py)
    texts = [list(b["text"]) for b in batches]
    source = resolve_model(args.model)
    embedder = Embedder(source, device="cpu", threads=1, batch_size=args.batch_size)
    floats = np.concatenate([embedder.encode_documents(t) for t in texts[: max(1, 512 // args.batch_size)]])
    calibration = fit_int8(floats, "global")
    encoder = DocumentEncoder(source, "int8", calibration.to_json(), device="cpu", batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "bench.db")
        store = MilvusStore(uri)
        identity = CollectionIdentity(
            model=embedder.identity().to_dict(),
            precision="int8",
            vector_type=store.capabilities.vector_type_for("int8"),
            calibration=calibration.to_json(),
            partitioning=DocumentSpec().partitioning(),
            hnsw={"M": 16, "efConstruction": 64},
        )
        store.create_collection(COLLECTION, identity, MAX_TEXT_BYTES)
        store.ensure_partitions(COLLECTION, ["_default"])
        writer = BatchWriter(uri, None, COLLECTION, identity.vector_type, MAX_TEXT_BYTES)

        def embed_only() -> tuple[int, int]:
            tokens = padded = 0
            for t in texts:
                enc = embedder.encode_documents_counted(t)
                tokens, padded = tokens + int(enc.tokens.sum()), padded + int(enc.padded.sum())
            return tokens, padded

        def pipeline() -> tuple[int, int]:
            tokens = padded = written = 0
            for batch in batches:
                out = encoder(batch)
                tokens, padded = tokens + int(out[C_TOKENS].sum()), padded + int(out[C_PADDED].sum())
                written += sum(writer(out)["written"])
            if written != len(records):
                raise RuntimeError(f"pipeline wrote {written} of {len(records)} documents")
            return tokens, padded

        best: dict[str, float] = {}
        counts: dict[str, tuple[int, int]] = {}
        embed_only()  # warm-up: first-call allocations, both modes share the model
        for _ in range(args.rounds):
            for name, fn in (("embed_only", embed_only), ("embed_quantize_write", pipeline)):
                start = time.perf_counter()
                counts[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        stored = store.count(COLLECTION)
        store.close()

    tok = embedder.model.tokenizer([r["text"] for r in records], truncation=True, max_length=embedder.max_seq_length)
    lengths = np.array([len(ids) for ids in tok["input_ids"]])
    modes = {
        name: {
            "docs_per_s": round(len(records) / best[name], 2),
            "tokens_per_s": round(counts[name][0] / best[name], 1),
            "seconds": round(best[name], 3),
            "padding_ratio": round(padding_ratio(*counts[name]), 4),
        }
        for name in best
    }
    ratio = modes["embed_quantize_write"]["docs_per_s"] / modes["embed_only"]["docs_per_s"]
    return {
        "benchmark": "embed_vs_pipeline",
        "beir": str(args.beir),
        "model": source.name,
        "documents": len(records),
        "stored": stored,
        "rows_per_call": args.batch_size,
        "batch_size": args.batch_size,
        "threads": 1,
        "rounds": args.rounds,
        "tokens": {
            "mean": round(float(lengths.mean()), 1),
            "p50": int(np.percentile(lengths, 50)),
            "p90": int(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "share_truncated": round(float((lengths >= embedder.max_seq_length).mean()), 3),
        },
        "modes": modes,
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "writes": "serial, same process, Milvus Lite (the job overlaps writes with embedding in writer actors)",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beir", default=str(DEFAULT_BEIR), help="BEIR folder (default ../shared/data/cranfield)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--docs", type=int, default=480, help="documents in the long-tailed mix")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass and rows per call")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each mode counts")
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
