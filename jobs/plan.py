"""`python -m jobs.plan`: ETA, device-hours and Milvus memory for 1M, 10M and 100M documents.

Takes a measured throughput (`--tokens-per-s`, `--docs-per-s`, or `--from-benchmark FILE.json`:
the JSON of benchmarks/throughput.py or a backfill summary) and prints a table on stderr and
one JSON object as the last line of stdout. The arithmetic lives in reembed/capacity.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from reembed.capacity import KNOWN_DIMENSIONS, Throughput, format_plan, plan_capacity
from reembed.config import PlanConfig, load_settings
from reembed.errors import ConfigError, ReembedError

logger = logging.getLogger("jobs.plan")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="JSON, TOML or YAML file of settings (flags override it)")
    p.add_argument("--docs", help="corpus sizes, comma-separated, e.g. 1M,10M,100M (the default)")
    p.add_argument("--tokens-per-doc", type=float, help="mean tokens per document (default: from the benchmark)")
    p.add_argument("--model", help="hub name or path; its dimension comes from a known table or by loading it")
    p.add_argument("--dimension", type=int, help="embedding dimension (skips looking the model up)")
    p.add_argument("--docs-per-s", type=float, help="measured documents/s of one worker, at --tokens-per-doc")
    p.add_argument("--tokens-per-s", type=float, help="measured tokens/s of one worker")
    p.add_argument("--from-benchmark", help="JSON holding tokens_per_s (benchmarks/throughput.py, a job summary)")
    p.add_argument("--device", choices=["gpu", "cpu"], help="what one worker is (default gpu, or the benchmark's)")
    p.add_argument("--cores", type=int, help="CPU cores of one CPU worker (for core-hours)")
    p.add_argument("--workers", "--gpus", dest="workers", type=int, help="workers (GPUs) in parallel (default 1)")
    p.add_argument("--gpu-hour-usd", type=float, help="price of one device-hour, for a cost column")
    p.add_argument("--hnsw-m", type=int, help="HNSW M (default 32)")
    p.add_argument("--replicas", type=int, help="Milvus in-memory replicas (default 1)")
    p.add_argument("--text-bytes", type=float, help="stored text bytes per row (default 4 per token)")
    p.add_argument(
        "--int8-as-float",
        action="store_true",
        default=None,
        help="int8 codes stored as FLOAT_VECTOR (Milvus before 2.6, Milvus Lite)",
    )
    return p


def read_benchmark(path: str) -> dict[str, Any]:
    """The throughput a JSON file reports: its `planner` object, or its top level.

    Needs `tokens_per_s`, or `docs_per_s` with `tokens_per_doc`; `device` and `cores` are optional.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"from_benchmark: cannot read JSON from {path!r}: {exc}") from exc
    found = data.get("planner", data) if isinstance(data, dict) else {}
    if not (found.get("tokens_per_s") or (found.get("docs_per_s") and found.get("tokens_per_doc"))):
        raise ConfigError(
            f"from_benchmark: {path!r} holds neither tokens_per_s nor docs_per_s with tokens_per_doc "
            "(at top level or under 'planner')"
        )
    return found


def model_dimension(model: str) -> int:
    """Known dimension of a common model, else the model is loaded (offline where cached) to read it."""
    from reembed.embedder import canonical_model_name

    known = KNOWN_DIMENSIONS.get(canonical_model_name(model)) or KNOWN_DIMENSIONS.get(model)
    if known:
        return known
    from reembed.embedder import describe_model

    return describe_model(model)[1].dimension


def build_plan(cfg: PlanConfig):
    bench = read_benchmark(cfg.from_benchmark) if cfg.from_benchmark else {}
    tokens_per_doc = cfg.tokens_per_doc or bench.get("tokens_per_doc")
    if not tokens_per_doc:
        raise ConfigError("tokens_per_doc: expected the corpus's mean tokens per document (--tokens-per-doc)")
    device = cfg.device or bench.get("device_kind") or "gpu"
    cores = int(bench.get("cores", cfg.cores)) if device == "cpu" and cfg.cores == 1 else cfg.cores
    if cfg.tokens_per_s or bench.get("tokens_per_s"):
        throughput = Throughput(float(cfg.tokens_per_s or bench["tokens_per_s"]), device, cores)
    else:  # docs/s measured at the documents' own mean length
        rate = cfg.docs_per_s or bench["docs_per_s"]
        measured_tokens = bench.get("tokens_per_doc", tokens_per_doc)
        throughput = Throughput.from_docs_per_s(float(rate), float(measured_tokens), device, cores)
    dimension = cfg.dimension or model_dimension(cfg.model)
    return plan_capacity(
        tuple(cfg.docs),
        float(tokens_per_doc),
        dimension,
        throughput,
        workers=cfg.workers,
        hnsw_m=cfg.hnsw_m,
        replicas=cfg.replicas,
        hour_usd=cfg.gpu_hour_usd,
        text_bytes=cfg.text_bytes,
        model=cfg.model,
        int8_as_float=cfg.int8_as_float,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = vars(build_parser().parse_args(argv))
        cfg = load_settings(PlanConfig, args, args.pop("config"))
        plan = build_plan(cfg)
    except ReembedError as exc:
        logger.error("%s", exc)
        print(json.dumps({"error": str(exc), "retriable": exc.retriable}), flush=True)
        return 2 if exc.is_input_error else 1
    print(format_plan(plan), file=sys.stderr, flush=True)
    print(json.dumps(plan.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
