"""An incremental backfill (1% of documents changed) against a full one: same corpus, same run.

Sits beside the job, not in its flow. It builds a corpus of `--copies` x the Cranfield abstracts
(ids suffixed per copy, so every document is distinct), runs `python -m jobs.backfill` on it
into a fresh Milvus Lite .db (the full run: every document embedded), edits `--changed` of the
documents in place (their text gets a suffix), and runs the same command again (the incremental
run: every shard of the edited file read again and looked up by content hash, only the edited
documents embedded). Both runs are whole processes timed from outside, start-up included, as a
user meets them. Target: incremental <= 10% of the full run's time.

Prints progress to stderr and one JSON object as the last line of stdout:

    python benchmarks/incremental.py                      # 5 copies: 7,000 documents
    python benchmarks/incremental.py --copies 2 --out benchmarks/out/incremental.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("benchmarks.incremental")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "cranfield" / "corpus.jsonl"
TARGET_RATIO = 0.10


def build_corpus(source: Path, copies: int, out: Path) -> list[dict]:
    base = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    docs = [{**d, "_id": f"{d['_id']}-{c}"} for c in range(copies) for d in base]
    write(out, docs)
    return docs


def write(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def run_job(argv: list[str], log: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.backfill", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=fh
        )
    wall = time.perf_counter() - t0
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"backfill failed (exit {proc.returncode}); see {log}")
    return wall, json.loads(lines[-1])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(prog="python benchmarks/incremental.py", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--copies", type=int, default=5, help="copies of the corpus (default %(default)s)")
    p.add_argument("--changed", type=float, default=0.01, help="share of documents edited (default 1%%)")
    p.add_argument("--work-dir", default=None, help="keep the .db and logs here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="reembed-incr-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    docs = build_corpus(Path(args.corpus), args.copies, corpus)
    argv = [
        "--input", str(corpus), "--milvus-uri", str(work / "bench.db"), "--collection", "bench_incremental",
        "--output-dir", str(work / "runs"), "--calibration-sample", "256",
    ]  # fmt: skip
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logger.info("full run over %d documents", len(docs))
    full_s, full = run_job(argv, work / "full.log")
    logger.info("full run: %.1f s, %d written", full_s, full["written"])

    step = max(1, round(1 / args.changed))
    edited = 0
    for i in range(0, len(docs), step):
        if (docs[i].get("text") or "").strip():
            docs[i] = {**docs[i], "text": docs[i]["text"] + " (revised)"}
            edited += 1
    write(corpus, docs)
    logger.info("incremental run after editing %d documents", edited)
    incr_s, incr = run_job(argv, work / "incremental.log")
    logger.info("incremental run: %.1f s, %d embedded, %d unchanged", incr_s, incr["embedded"], incr["unchanged"])

    ratio = incr_s / full_s
    result = {
        "benchmark": "incremental",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "documents": len(docs),
        "edited": edited,
        "full": {"seconds": round(full_s, 2), "written": full["written"], "startup_seconds": full["startup_seconds"]},
        "incremental": {
            "seconds": round(incr_s, 2),
            "read": incr["read"],
            "embedded": incr["embedded"],
            "changed": incr["changed"],
            "unchanged": incr["unchanged"],
            "shards": incr["shards"],
            # The whole input read once before any work (ids only kept), inside "seconds".
            "census_seconds": incr["census_seconds"],
        },
        "ratio": round(ratio, 4),
        "target": f"<= {TARGET_RATIO}",
        "met": ratio <= TARGET_RATIO and incr["changed"] == edited and incr["embedded"] == edited,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "work_dir": str(work),
    }
    text = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
