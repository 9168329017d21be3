"""`python -m jobs.demo`: build a corpus, backfill it into Milvus Lite, search it, print timings.

The first thing a new user runs (`make demo`), so it needs nothing from the network: without
--input the corpus is the docstrings of the installed standard library and site-packages, read
with `ast` (nothing is imported, so no module's import-time side effects run). The corpus goes
through the same path as any other input: `jobs.backfill.run` (Ray Data -> embed + int8 ->
Milvus), then the search service (serve/app.py, Ray Serve) starts on the same Ray and the demo
queries it over HTTP. Results go to stdout for a person, the last line is one JSON summary.

Arguments after `--` go to the backfill unchanged (`python -m jobs.demo -- --actors 1`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import statistics
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jobs.ray_init import init_ray
from reembed.config import DEFAULT_MILVUS_URI
from serve.runtime import apply_serve_env

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_PATH = Path("./data/demo/corpus.jsonl")
DEFAULT_LIMIT = 3000
DEFAULT_COLLECTION = "demo"
DEFAULT_QUERIES = (
    "parse a JSON string into a Python object",
    "compress data with gzip",
    "run a subprocess and capture its output",
    "compute a SHA-256 hash of bytes",
    "read a CSV file",
)
MIN_DOC_CHARS = 80
# The job embeds its calibration sample in a pass of its own; half the job's default sample
# still puts ~20 of its 196k values above the 0.9999 quantile that sets the global int8 scale,
# and spares a user on a laptop CPU 512 embeddings.
DEMO_CALIBRATION_SAMPLE = 512
# Milvus keeps partitions in memory and caps them per collection; one per package is only worth
# it when there are few packages, otherwise the job's default partitioning is used.
MAX_PACKAGE_PARTITIONS = 64
# Bounds that keep the corpus build to a few seconds whatever is installed: a package whose files
# hold no usable docstrings would otherwise be parsed to its last file.
MAX_FILES_PER_PACKAGE = 150
MAX_FILE_BYTES = 1 << 20
SKIP_DIRS = frozenset(
    {
        "test", "tests", "testing", "idlelib", "turtledemo", "ensurepip", "pydoc_data", "lib2to3",
        "site-packages", "dist-packages", "lib-dynload", "examples", "example", "docs", "benchmarks",
        "vendor", "vendored", "third_party", "__pycache__",
    }
)  # fmt: skip
SKIP_FILE_STEMS = frozenset({"conftest", "setup"})

# The backfill summary's fields that go into the demo's final JSON line.
SUMMARY_KEYS = (
    "read", "written", "rejected", "new", "changed", "unchanged", "embedded", "docs_per_s", "seconds",
    "startup_seconds", "collection", "model", "precision", "vector_type", "milvus", "device", "actors", "manifest",
)  # fmt: skip

F_ID = "_id"
F_TITLE = "title"
F_TEXT = "text"
F_PACKAGE = "package"


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    path: str
    documents: int
    packages: int
    seconds: float


# --- corpus: docstrings read with ast ------------------------------------------------------------


def default_roots() -> list[Path]:
    """Where the corpus comes from: the standard library first, then site-packages."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib"):
        path = Path(paths[key])
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def _is_public_name(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_")


def _is_skipped_dir(name: str) -> bool:
    return name in SKIP_DIRS or not _is_public_name(name)


def _is_skipped_file(name: str) -> bool:
    if not name.endswith(".py"):
        return True
    stem = name[:-3]
    if stem == "__init__":
        return False
    return not _is_public_name(stem) or stem in SKIP_FILE_STEMS or stem.startswith("test_") or stem.endswith("_test")


def list_packages(root: Path) -> list[tuple[str, Path]]:
    """Top-level public modules and packages under `root`, sorted by name."""
    found: list[tuple[str, Path]] = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not _is_skipped_dir(entry.name):
            found.append((entry.name, Path(entry.path)))
        elif entry.is_file() and not _is_skipped_file(entry.name) and entry.name != "__init__.py":
            found.append((entry.name[:-3], Path(entry.path)))
    return found


def _iter_module_files(path: Path) -> Iterator[Path]:
    """A package's .py files, `__init__.py` first in each directory, then by name; lazily."""
    if path.is_file():
        yield path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not _is_skipped_dir(d))
        files = sorted(f for f in filenames if not _is_skipped_file(f))
        files.sort(key=lambda f: f != "__init__.py")  # stable: keeps the rest sorted
        for name in files:
            yield Path(dirpath) / name


def _module_name(file: Path, package: str, package_path: Path) -> str:
    if package_path.is_file():
        return package
    parts = [package, *file.relative_to(package_path).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _iter_definitions(body: Sequence[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """Public classes, functions and methods in source order, with their qualified names.

    Definitions under `if`/`try` at module or class level count (the stdlib picks platform
    variants that way); function bodies are not entered, nested helpers are not API.
    """
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not _is_public_name(node.name):
                continue
            name = f"{prefix}.{node.name}"
            yield name, node
            if isinstance(node, ast.ClassDef):
                yield from _iter_definitions(node.body, name)
        elif isinstance(node, ast.If):
            yield from _iter_definitions(node.body, prefix)
            yield from _iter_definitions(node.orelse, prefix)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _iter_definitions(block, prefix)


def _docstring(node: ast.AST) -> str | None:
    raw = ast.get_docstring(node, clean=False)  # type: ignore[arg-type]
    if raw is None and isinstance(node, ast.Module):
        raw = _assigned_module_doc(node)
    return inspect.cleandoc(raw) if raw else None


def _assigned_module_doc(module: ast.Module) -> str | None:
    """A module's `__doc__ = "..."`: some (hashlib) put a licence comment block first and assign it."""
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__doc__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    return None


def read_file_docs(file: Path, module: str, package: str, min_chars: int = MIN_DOC_CHARS) -> list[dict[str, str]]:
    """Corpus records for one source file, or none if it cannot be read or parsed.

    Returns a list rather than yielding, so the syntax tree is freed before the caller moves on:
    hundreds of suspended package readers each holding a tree make the garbage collector's full
    passes, not parsing, the main cost.
    """
    try:
        if file.stat().st_size > MAX_FILE_BYTES:
            return []
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except (OSError, SyntaxError, ValueError, RecursionError):  # Python 2 leftovers, templates
        return []
    docs = []
    for name, node in [(module, tree), *_iter_definitions(tree.body, module)]:
        text = _docstring(node)
        if text and len(text) >= min_chars:
            docs.append({F_ID: name, F_TITLE: name, F_TEXT: text, F_PACKAGE: package})
    return docs


def iter_package_docs(
    package: str, path: Path, min_chars: int = MIN_DOC_CHARS, max_files: int = MAX_FILES_PER_PACKAGE
) -> Iterator[dict[str, str]]:
    """Corpus records for one top-level package, a module's docstring before its members'."""
    for count, file in enumerate(_iter_module_files(path)):
        if count >= max_files:
            return
        yield from read_file_docs(file, _module_name(file, package, path), package, min_chars)


def build_corpus(
    limit: int = DEFAULT_LIMIT, roots: Sequence[Path] | None = None, min_chars: int = MIN_DOC_CHARS
) -> list[dict[str, str]]:
    """Up to `limit` docstring records, the same ones on every run against the same installation.

    Taken round-robin over packages (the standard library's before site-packages' in each
    round), so a small limit still covers many packages instead of the first few alphabetically,
    and a large package cannot crowd out the rest. Parsing is lazy: a package is read only as far
    as its share. Ids and texts already taken are skipped (the first package wins).
    """
    if limit < 1:
        raise ValueError(f"limit: expected a positive number of documents, got {limit}")
    sources: list[Iterator[dict[str, str]]] = []
    seen_packages: set[str] = set()
    for root in default_roots() if roots is None else roots:
        for package, path in list_packages(Path(root)):
            if package in seen_packages:  # a site-packages backport shadowed by the stdlib module
                continue
            seen_packages.add(package)
            sources.append(iter_package_docs(package, path, min_chars))
    docs: list[dict[str, str]] = []
    seen_ids: set[str] = set()
    seen_texts: set[str] = set()
    while sources and len(docs) < limit:
        active = []
        for source in sources:
            for doc in source:
                if doc[F_ID] in seen_ids or doc[F_TEXT] in seen_texts:
                    continue
                seen_ids.add(doc[F_ID])
                seen_texts.add(doc[F_TEXT])
                docs.append(doc)
                active.append(source)
                break
            if len(docs) >= limit:
                break
        sources = active
    return docs


def write_jsonl(docs: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a half-written corpus from an interrupted run is never read back
    return path


# --- backfill and search -------------------------------------------------------------------------


def backfill_flags(args: argparse.Namespace, input_path: str, partition_by: str | None) -> list[str]:
    flags = ["--input", input_path, "--milvus-uri", args.milvus_uri, "--collection", args.collection]
    if partition_by:
        flags += ["--partition-by", partition_by]
    if args.output_dir:
        flags += ["--output-dir", args.output_dir]
    if args.device:
        flags += ["--device", args.device]
    if args.calibration_sample:
        flags += ["--calibration-sample", str(args.calibration_sample)]
    return flags


def drop_collection(uri: str, collection: str) -> None:
    """Drop the demo's collection so the results reflect this run's corpus only.

    A collection left by an earlier run may hold other documents, or another partitioning (which
    the backfill would rightly refuse to mix). A .db is opened through the job's own Lite server,
    not embedded: pymilvus keeps an embedded .db locked until the process exits, and the
    backfill's server must open it next.
    """
    from reembed.lite import LiteServer, is_lite_uri
    from reembed.store import MilvusStore

    with LiteServer(uri) if is_lite_uri(uri) else contextlib.nullcontext(uri) as server_uri:
        store = MilvusStore(server_uri)
        try:
            if store.has_collection(collection):
                logger.info("dropping collection %r left by an earlier run (--keep-collection keeps it)", collection)
                store.drop_collection(collection)
        finally:
            store.close()


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 2)


def _post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[int, dict[str, Any], float]:
    """POST JSON over real HTTP; returns (status, body, client-side milliseconds)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, json.loads(exc.read() or b"{}")
    return status, payload, (time.perf_counter() - t) * 1e3


def _wait_ready(base: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"search service not ready after {timeout:.0f}s: {last}")


def start_service(uri: str, collection: str, device: str, port: int) -> str:
    """Start the search service (serve/app.py) on this Ray and wait until /readyz says ready."""
    from ray import serve

    from reembed.config import ServiceConfig
    from reembed.embedder import pick_device
    from serve.app import build_app

    t = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    layout: dict[str, Any] = {}
    if pick_device(device) == "cpu":
        # One machine without a GPU: the service's CPU configuration (README, "Embedding in the
        # ingress"): the model in the ingress replica, on every core.
        from jobs.pipeline import driver_cores

        layout = {"embed_in": "ingress", "embedder_threads": driver_cores()}
    cfg = ServiceConfig(milvus_uri=uri, collection=collection, device=device, min_replicas=1, max_replicas=1, **layout)
    logger.info("search service: embedding in %s", "the ingress replica" if layout else "a QueryEmbedder deployment")
    serve.run(build_app(cfg), name="reembed", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    ready = _wait_ready(base)
    logger.info("search service ready on %s in %.1fs: %s", base, time.perf_counter() - t, ready)
    return base


def run_searches(base: str, queries: Sequence[str], k: int, repeats: int) -> list[dict[str, Any]]:
    """POST each query to the service over HTTP and print its hits and timings.

    The first call of a query embeds it (a cache miss); the `repeats` calls after it are answered
    from the service's query-embedding cache, and are reported apart.
    """
    results = []
    for query in queries:
        status, first, first_client = _post_json(base + "/search", {"query": query, "k": k})
        if status != 200:
            raise RuntimeError(f"search for {query!r} failed with HTTP {status}: {first}")
        again = [_post_json(base + "/search", {"query": query, "k": k}) for _ in range(repeats)]
        hits = first["results"]
        print(f'\nquery: "{query}"')
        for rank, hit in enumerate(hits, 1):
            snippet = " ".join(str(hit["fields"].get("text", "")).split())[:80]
            print(f"  {rank}. {hit['score']:6.3f}  {hit['id']:<45}  {snippet}")
        t = first["timing_ms"]
        line = (
            f"  time: embed {t['embed']:.1f} ms + search {t['search']:.1f} ms = {t['total']:.1f} ms in the service, "
            f"{first_client:.1f} ms over HTTP"
        )
        cached = {}
        if again:
            cached = {
                "service_total": _median([r[1]["timing_ms"]["total"] for r in again]),
                "http": _median([r[2] for r in again]),
                "cache_hits": sum(r[1].get("cache_hits", 0) for r in again),
            }
            line += f"; repeated (cache): {cached['service_total']:.1f} ms in the service, {cached['http']:.1f} ms HTTP"
        print(line)
        results.append(
            {
                "query": query,
                "top_id": hits[0]["id"] if hits else None,
                "top_score": round(hits[0]["score"], 4) if hits else None,
                "first_ms": {**{key: round(v, 2) for key, v in t.items()}, "http": round(first_client, 2)},
                "cached_p50_ms": cached,
            }
        )
    return results


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description=__doc__.splitlines()[0],
        epilog="Arguments after -- go to the backfill as they are: python -m jobs.demo -- --actors 1",
    )
    p.add_argument("--input", help="JSONL/Parquet corpus (default: build one from installed docstrings)")
    p.add_argument("--limit", type=_count(1), default=DEFAULT_LIMIT, help="documents in the built corpus")
    p.add_argument("--corpus-out", default=str(DEFAULT_CORPUS_PATH), help="where the built corpus is written")
    p.add_argument("--milvus-uri", default=DEFAULT_MILVUS_URI, help="Milvus URI or Milvus Lite .db path")
    p.add_argument("--collection", default=DEFAULT_COLLECTION)
    p.add_argument(
        "--keep-collection", action="store_true", help="add to an existing collection instead of dropping it first"
    )
    p.add_argument("--query", action="append", help="a query to run (repeatable; default: a few stdlib questions)")
    p.add_argument("--k", type=_count(1), default=5, help="hits per query")
    p.add_argument("--repeats", type=_count(0), default=5, help="repeats of each query (answered from the cache)")
    p.add_argument("--port", type=_count(1), default=8000, help="HTTP port of the search service")
    p.add_argument("--keep-serving", action="store_true", help="keep the service up after the demo queries")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument(
        "--calibration-sample",
        type=int,
        default=DEMO_CALIBRATION_SAMPLE,
        help=f"documents the int8 scale is fitted on (default {DEMO_CALIBRATION_SAMPLE})",
    )
    p.add_argument("--output-dir", help="where run manifests go (backfill's default: ./data/runs)")
    return p


def _init_ray() -> bool:
    """A local Ray shared by the backfill and the service (the backfill reuses a running one)."""
    import ray

    if ray.is_initialized():
        return False
    if not os.environ.get("RAY_ADDRESS"):
        apply_serve_env()  # a local Ray: its Serve runs in the throughput-optimised mode (serve/runtime.py)
    init_ray(os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    return True


def _stop_ray() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def split_backfill_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The demo's own arguments, and those after `--` that go to the backfill as they are."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    own, passthrough = split_backfill_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    # Imported here, not at the top: they pull in torch and pymilvus, which the corpus builder
    # (and its unit test) do not need.
    from jobs.backfill import parse_config, run
    from reembed.errors import ReembedError

    started = time.monotonic()
    partition_by = None
    if args.input:
        input_path = args.input
        corpus: dict[str, Any] = {"path": input_path, "built": False}
    else:
        t = time.monotonic()
        docs = build_corpus(args.limit)
        packages = {d[F_PACKAGE] for d in docs}
        input_path = str(write_jsonl(docs, Path(args.corpus_out)))
        stats = CorpusStats(input_path, len(docs), len(packages), round(time.monotonic() - t, 3))
        corpus = {**dataclasses.asdict(stats), "built": True}
        print(f"corpus: {len(docs)} docstrings from {len(packages)} packages in {stats.seconds:.2f}s -> {input_path}")
        if len(packages) <= MAX_PACKAGE_PARTITIONS:
            partition_by = F_PACKAGE
    try:
        # The backfill's parser keeps the last value of a repeated flag, so passed-through ones win.
        cfg = parse_config(backfill_flags(args, input_path, partition_by) + passthrough)
        if not args.keep_collection:
            drop_collection(cfg.milvus_uri, cfg.collection)
        started_ray = _init_ray()
        try:
            summary = run(cfg)
            print("backfill: " + json.dumps(summary), flush=True)
            base = start_service(cfg.milvus_uri, cfg.collection, cfg.device, args.port)
            searches = run_searches(base, args.query or list(DEFAULT_QUERIES), args.k, args.repeats)
            print(
                f"\nsearch service: curl -s {base}/search -H 'Content-Type: application/json' "
                '-d \'{"query": "read a CSV file", "k": 3}\'',
                flush=True,
            )
            if args.keep_serving:
                print("serving until Ctrl-C", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
        finally:
            if started_ray:
                _stop_ray()
    except ReembedError as exc:
        logger.error("%s", exc)
        print(json.dumps({"error": str(exc), "retriable": exc.retriable}), flush=True)
        return 2 if exc.is_input_error else 1
    final = {
        "corpus": corpus,
        "backfill": {key: summary.get(key) for key in SUMMARY_KEYS},
        "partitions": len(summary.get("partitions", {})),
        "service": base,
        "queries": searches,
        "total_seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
