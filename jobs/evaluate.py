"""`python -m jobs.evaluate --beir DIR --json OUT`: retrieval quality through the real pipeline.

1. Backfills DIR's corpus with the real job (`jobs.backfill`, Ray Data) into Milvus as float32:
   the only time documents are embedded.
2. Reads those vectors back and stores the same documents as int8 codes and as binary sign bits,
   each with float16 re-rank copies (reembed/evaluation.py). Binary needs a BINARY_VECTOR field:
   on Milvus Lite that precision is refused with the reason, never emulated.
3. Embeds the judged queries with the collection's model (checked by weights hash, as the service
   does) and ranks them: exactly in memory (the reference, `exact`), and through Milvus with the
   service's search path (reembed/search.py) as float32, int8, binary + re-rank and int8 +
   re-rank.
4. Sweeps HNSW (M x efConstruction x ef) over the float32 vectors: ANN recall@10 against exact
   search, build time, latency, memory; JSON and a PNG plot.
5. Reports the int8 calibration: its sample, and the share of values clipped on documents after it.

The table goes to stderr, the JSON report to --json and, as one line, to stdout. The collections
`<prefix>_float32`, `_int8` and `_binary` are dropped and rebuilt at the start and kept afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from jobs.backfill import run as run_backfill
from reembed.config import BackfillConfig, EvaluateConfig, load_settings
from reembed.errors import CapabilityError, ReembedError
from reembed.evaluation import (
    DEPTH,
    MODES,
    REFERENCE,
    TABLE_METRICS,
    TOP_K,
    SearchMode,
    bytes_per_vector,
    encoded_identity,
    evaluate_mode,
    format_report,
    hnsw_params,
    hnsw_sweep_point,
    in_memory_rankings,
    load_indexed,
    percentile_ms,
    plot_sweep,
    read_stored_corpus,
    run_from_indices,
    write_encoded_collection,
)
from reembed.lite import LiteServer, is_lite_uri
from reembed.metrics import evaluate, exact_search, load_beir
from reembed.quantize import binarize, clipping_report, fit_int8
from reembed.search import QueryCodec, load_query_model
from reembed.store import MilvusStore

logger = logging.getLogger("jobs.evaluate")

# Targets of issue 4, checked on every run and printed with the table.
FLOAT32_MAX_NDCG_GAP = 0.005
INT8_MIN_RATIO = 0.995
BINARY_RERANK_MIN_RATIO = 0.99
# Re-rank depths (k x multiplier) compared in memory, to choose --rescore-multiplier from numbers.
RERANK_DEPTH_MULTIPLIERS = (1, 2, 4, 10, 20)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="JSON, TOML or YAML file of settings (flags override it)")
    p.add_argument("--beir", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", help="qrels split (default test)")
    p.add_argument("--json", dest="json_out", help="where the JSON report goes")
    p.add_argument("--plot", help="HNSW sweep PNG (default: beside --json, <name>.hnsw.png)")
    p.add_argument("--milvus-uri", help="Milvus URI or Milvus Lite .db (default ./data/evaluate/evaluate.db)")
    p.add_argument("--milvus-token")
    p.add_argument("--collection-prefix", help="collections <prefix>_float32/_int8/_binary/_hnsw (default eval)")
    p.add_argument("--model", help="hub name or local path (default all-MiniLM-L6-v2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--ef", type=int, help="HNSW ef for the precision table (default 64, the service's)")
    p.add_argument("--rescore-multiplier", type=int, help="re-rank the first stage's top k * this (default 10)")
    p.add_argument("--calibration-sample", type=int, help="int8 scale fitted on the first N documents")
    p.add_argument("--calibration-quantile", type=float)
    p.add_argument("--hnsw-m", type=int)
    p.add_argument("--hnsw-ef-construction", type=int)
    p.add_argument("--no-sweep", dest="sweep", action="store_const", const=False, help="skip the HNSW sweep")
    p.add_argument("--sweep-m", help="comma-separated HNSW M values (default 8,16,32,64)")
    p.add_argument("--sweep-ef-construction", help="comma-separated efConstruction values (default 64,200)")
    p.add_argument("--sweep-ef", help="comma-separated search ef values (default 10,16,32,64,128,256)")
    p.add_argument("--actors", type=int, help="the backfill's embedding actors")
    p.add_argument("--threads-per-actor", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--output-dir", help="the backfill's run manifests (default ./data/runs)")
    return p


def parse_config(argv: list[str] | None = None) -> EvaluateConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    return load_settings(EvaluateConfig, args, config_file)


def collection_names(prefix: str) -> dict[str, str]:
    return {kind: f"{prefix}_{kind}" for kind in ("float32", "int8", "binary", "hnsw")}


def backfill_float32(cfg: EvaluateConfig, uri: str, collection: str) -> dict[str, Any]:
    """The real job, float32: the vectors every precision is then made from."""
    job = BackfillConfig(
        input=str(Path(cfg.beir) / "corpus.jsonl"),
        precision="float32",
        milvus_uri=uri,
        milvus_token=cfg.milvus_token,
        collection=collection,
        model=cfg.model,
        device=cfg.device,
        hnsw_m=cfg.hnsw_m,
        hnsw_ef_construction=cfg.hnsw_ef_construction,
        actors=cfg.actors,
        threads_per_actor=cfg.threads_per_actor,
        batch_size=cfg.batch_size,
        output_dir=cfg.output_dir,
    )
    return run_backfill(job)


def _scores(run: dict[str, list[str]], qrels: dict, k: int) -> dict[str, float]:
    return evaluate(run, qrels, ks=(k,))


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in metrics.items()}


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run one evaluation; returns the report (also written to cfg.json_out)."""
    started = time.monotonic()
    corpus_records, queries, qrels = load_beir(cfg.beir, cfg.split)
    query_ids = [qid for qid in qrels if qid in queries]
    if len(query_ids) < len(qrels):
        logger.warning("%d judged queries have no text in queries.jsonl: left out", len(qrels) - len(query_ids))
    qrels = {qid: qrels[qid] for qid in query_ids}
    names = collection_names(cfg.collection_prefix)
    server = LiteServer(cfg.milvus_uri) if is_lite_uri(cfg.milvus_uri) else contextlib.nullcontext(cfg.milvus_uri)
    with server as uri:
        store = MilvusStore(uri, cfg.milvus_token)
        try:
            for name in names.values():
                if store.has_collection(name):
                    logger.info("dropping %r from an earlier evaluation", name)
                    store.drop_collection(name)
            report = _evaluate(cfg, store, uri, names, queries, query_ids, qrels, list(corpus_records))
        finally:
            store.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    out = Path(cfg.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _evaluate(
    cfg: EvaluateConfig,
    store: MilvusStore,
    uri: str,
    names: dict[str, str],
    queries: dict[str, str],
    query_ids: list[str],
    qrels: dict[str, dict[str, int]],
    corpus_ids: list[str],
) -> dict[str, Any]:
    t = time.monotonic()
    summary = backfill_float32(cfg, uri, names["float32"])
    backfill_s = time.monotonic() - t
    base = store.read_identity(names["float32"])
    corpus = read_stored_corpus(store, names["float32"], corpus_ids)
    docs, doc_ids = corpus.floats, corpus.ids
    logger.info("read back %d float32 vectors written by the job", len(doc_ids))

    # Queries through the collection's model, checked by weights hash as the service does.
    embedder = load_query_model(base.model, cfg.device)
    texts = [queries[qid] for qid in query_ids]
    q_floats = embedder.encode_queries(texts)
    embed_ms = []
    for text in texts:
        t0 = time.perf_counter()
        embedder.encode_queries([text])
        embed_ms.append((time.perf_counter() - t0) * 1e3)

    exact_idx = exact_search(q_floats, docs, DEPTH)
    exact_depth = run_from_indices(exact_idx, query_ids, doc_ids)
    exact_top = {qid: ranking[:TOP_K] for qid, ranking in exact_depth.items()}
    exact = _round({**_scores(exact_top, qrels, TOP_K), **_scores(exact_depth, qrels, DEPTH)})

    # int8 calibration as the job fits it: one scale on the first documents of the corpus.
    sample_size = min(cfg.calibration_sample, len(doc_ids))
    calibration = fit_int8(docs[:sample_size], "global", cfg.calibration_quantile)
    after = docs[sample_size:]
    calibration_report = {
        "sample_size": sample_size,
        "scheme": calibration.scheme,
        "quantile": calibration.quantile,
        "scale": calibration.scale[0],
        "sample_clipped_fraction": calibration.clipped_fraction(docs[:sample_size]),
        "after_calibration": clipping_report(calibration, len(after), int(calibration.clipped_per_row(after).sum())),
        "queries_clipped_fraction": calibration.clipped_fraction(q_floats),
    }

    caps = store.capabilities
    max_text_bytes = BackfillConfig.model_fields["max_text_bytes"].default
    int8_identity = encoded_identity(base, "int8", caps.vector_type_for("int8"), calibration)
    write_encoded_collection(store, names["int8"], int8_identity, corpus, calibration.quantize(docs), max_text_bytes)
    binary_identity, refused = None, None
    try:
        binary_identity = encoded_identity(base, "binary", caps.vector_type_for("binary"), None)
    except CapabilityError as exc:
        refused = str(exc)
        logger.warning("binary + re-rank refused: %s", refused)
    if binary_identity is not None:
        write_encoded_collection(store, names["binary"], binary_identity, corpus, binarize(docs), max_text_bytes)
    indexes = {name: load_indexed(store, names[name]) for name in ("float32", "int8")}
    if binary_identity is not None:
        indexes["binary"] = load_indexed(store, names["binary"])

    m = cfg.rescore_multiplier
    modes = {
        "float32": SearchMode("float32", names["float32"], QueryCodec(base), cfg.ef),
        "int8": SearchMode("int8", names["int8"], QueryCodec(int8_identity), cfg.ef),
        "int8+rerank": SearchMode("int8+rerank", names["int8"], QueryCodec(int8_identity), cfg.ef, m),
    }
    if binary_identity is not None:
        modes["binary+rerank"] = SearchMode("binary+rerank", names["binary"], QueryCodec(binary_identity), cfg.ef, m)
    in_memory = {k: in_memory_rankings(q_floats, docs, calibration, m, k, list(modes)) for k in (TOP_K, DEPTH)}
    results: dict[str, dict[str, Any]] = {}
    for name in MODES:
        if name not in modes:
            results[name] = {"refused": refused}
            continue
        mode = modes[name]
        logger.info("searching %s through Milvus (%s)", name, mode.collection)
        row = evaluate_mode(store, mode, q_floats, query_ids, qrels, exact_top)
        row.update(bytes_per_vector(name, corpus.dimension, mode.codec.identity.vector_type))
        kind = name.split("+")[0]
        row["collection"] = mode.collection
        row["vector_type"] = mode.codec.identity.vector_type
        row["index"] = {key: indexes[kind].get(key) for key in ("index_type", "metric_type")}
        if kind != "binary":
            row["index"].update(hnsw_params(indexes[kind]))
        row["rescore_multiplier"] = mode.rescore_multiplier
        mem = {
            **_scores(run_from_indices(in_memory[TOP_K][name], query_ids, doc_ids), qrels, TOP_K),
            **_scores(run_from_indices(in_memory[DEPTH][name], query_ids, doc_ids), qrels, DEPTH),
        }
        row["in_memory"] = _round({key: mem[key] for key in TABLE_METRICS})
        results[name] = row
    reference = results[REFERENCE][f"ndcg@{TOP_K}"]
    for row in results.values():
        if "refused" not in row:
            row[f"ndcg@{TOP_K}_ratio_to_float32"] = round(row[f"ndcg@{TOP_K}"] / reference, 4) if reference else None

    # How deep re-ranking must reach: nDCG@10 of the re-rank modes in memory for several multipliers.
    rerank_modes = [name for name in modes if name.endswith("+rerank")]
    rerank_depth = {
        str(mult): {
            name: round(_scores(run_from_indices(ranked, query_ids, doc_ids), qrels, TOP_K)[f"ndcg@{TOP_K}"], 4)
            for name, ranked in in_memory_rankings(q_floats, docs, calibration, mult, TOP_K, rerank_modes).items()
        }
        for mult in RERANK_DEPTH_MULTIPLIERS
    }

    sweep: list[dict[str, Any]] = []
    plot_path = None
    if cfg.sweep:
        exact_lists = [exact_top[qid] for qid in query_ids]
        for hnsw_m in cfg.sweep_m:
            for efc in cfg.sweep_ef_construction:
                logger.info("HNSW sweep: M=%d efConstruction=%d", hnsw_m, efc)
                sweep += hnsw_sweep_point(
                    store, names["hnsw"], base, corpus, q_floats, exact_lists, hnsw_m, efc, cfg.sweep_ef
                )
        plot_path = cfg.plot or str(Path(cfg.json_out).with_suffix(".hnsw.png"))
        try:
            plot_sweep(
                sweep,
                plot_path,
                f"HNSW on {Path(cfg.beir).name} ({len(doc_ids)} docs, d={corpus.dimension}), Milvus {caps.version}",
            )
        except ImportError:
            logger.warning("matplotlib is not installed (pip install -e '.[eval]'): no plot, the JSON has the sweep")
            plot_path = None

    report = {
        "evaluation": "retrieval quality through the pipeline",
        "data": {"name": Path(cfg.beir).name, "documents": len(doc_ids), "queries": len(query_ids)},
        "model": {k: base.model.get(k) for k in ("name", "revision", "dimension", "weights_sha256")},
        "milvus": {"uri": cfg.milvus_uri, "version": caps.version, "lite": caps.is_lite},
        "search": {"k": TOP_K, "depth": DEPTH, "ef": cfg.ef, "rescore_multiplier": m, "rerank_copies": "float16"},
        "exact": exact,
        "results": results,
        "targets": _targets(exact, results),
        "calibration": calibration_report,
        "rerank_depth_in_memory": rerank_depth,
        "hnsw_sweep": sweep,
        "plot": plot_path,
        "timings": {
            "backfill_s": round(backfill_s, 1),
            "query_embed_ms_p50": percentile_ms(embed_ms, 50),
        },
        "backfill": {k: summary.get(k) for k in ("read", "written", "rejected", "docs_per_s", "seconds", "manifest")},
        "config": cfg.model_dump(exclude={"milvus_token"}),
    }
    return report


def _targets(exact: dict[str, float], results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    key = f"ndcg@{TOP_K}"
    float32 = results[REFERENCE][key]

    def ratio(name: str) -> float | None:
        row = results[name]
        return None if "refused" in row or not float32 else row[key] / float32

    gap = abs(float32 - exact[key])
    int8, binary = ratio("int8"), ratio("binary+rerank")
    return {
        "float32_vs_exact": {
            "name": "|nDCG@10 float32 via Milvus - exact|",
            "value": round(gap, 4),
            "want": f"<= {FLOAT32_MAX_NDCG_GAP}",
            "met": gap <= FLOAT32_MAX_NDCG_GAP,
        },
        "int8_ratio": {
            "name": "nDCG@10 int8 / float32",
            "value": None if int8 is None else round(int8, 4),
            "want": f">= {INT8_MIN_RATIO}",
            "met": None if int8 is None else int8 >= INT8_MIN_RATIO,
        },
        "binary_rerank_ratio": {
            "name": "nDCG@10 binary+rerank / float32",
            "value": None if binary is None else round(binary, 4),
            "want": f">= {BINARY_RERANK_MIN_RATIO}",
            "met": None if binary is None else binary >= BINARY_RERANK_MIN_RATIO,
        },
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = parse_config(argv)
        report = run(cfg)
    except ReembedError as exc:
        logger.error("%s", exc)
        print(json.dumps({"error": str(exc), "retriable": exc.retriable}), flush=True)
        return 2 if exc.is_input_error else 1
    print(format_report(report), file=sys.stderr, flush=True)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
