"""`python -m jobs.backup snapshot|restore`: a collection to Parquet files and back into a new collection.

    python -m jobs.backup snapshot --milvus-uri http://milvus:19530 --collection documents --out /backups/docs-1
    python -m jobs.backup restore --milvus-uri http://milvus:19530 --from /backups/docs-1 \
        --collection documents_restored --alias documents

A thin entrypoint over reembed/backup.py (no Ray: one process streams rows in and out of Milvus). A
Milvus Lite `.db` path works as the URI too. The last line on stdout is one JSON summary; errors
print `{"error", "retriable"}` and exit 2 (bad input) or 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from reembed.backup import DEFAULT_BATCH_ROWS, DEFAULT_ROWS_PER_FILE, restore, snapshot
from reembed.config import DEFAULT_MILVUS_URI
from reembed.errors import ReembedError
from reembed.store import MilvusStore

logger = logging.getLogger("jobs.backup")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.backup", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--milvus-uri", default=os.environ.get("REEMBED_MILVUS_URI", DEFAULT_MILVUS_URI))
    common.add_argument("--milvus-token", default=os.environ.get("REEMBED_MILVUS_TOKEN"))
    common.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per read/write request")
    sub = p.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", parents=[common], help="write a collection to Parquet files")
    snap.add_argument("--collection", required=True, help="collection or alias to back up")
    snap.add_argument("--out", required=True, help="new (or empty) directory for the backup")
    snap.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE)
    rest = sub.add_parser("restore", parents=[common], help="rebuild a backup as a new collection")
    rest.add_argument("--from", dest="source", required=True, help="a backup directory")
    rest.add_argument("--collection", required=True, help="name of the NEW collection")
    rest.add_argument("--alias", help="point this alias at the restored collection (the switch-over)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    store = MilvusStore(args.milvus_uri, args.milvus_token)
    try:
        if args.command == "snapshot":
            manifest = snapshot(store, args.collection, args.out, args.rows_per_file, args.batch_rows)
            return {
                "command": "snapshot",
                "collection": manifest["source"]["collection"],
                "out": str(args.out),
                "rows": manifest["rows"],
                "partitions": {p["name"]: p["rows"] for p in manifest["partitions"]},
                "files": sum(len(p["files"]) for p in manifest["partitions"]),
            }
        return {"command": "restore", **restore(store, args.source, args.collection, args.alias, args.batch_rows)}
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except ReembedError as exc:
        logger.error("%s", exc)
        print(json.dumps({"error": str(exc), "retriable": exc.retriable}), flush=True)
        return 2 if exc.is_input_error else 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
