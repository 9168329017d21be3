"""The demo's corpus builder: docstrings read with ast, deterministic, public names only, bounded."""

from __future__ import annotations

import json
import sysconfig
import textwrap
from pathlib import Path

import pytest

from jobs.demo import build_corpus, write_jsonl

LONG = "This docstring is long enough to be kept: it explains what the thing does, and why, in detail."
FIELDS = {"_id", "title", "text", "package"}


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    _write(
        root / "alpha" / "__init__.py",
        f'''
        """Alpha package. {LONG}"""

        def public_fn():
            """{LONG} (public_fn)"""

        def _private_fn():
            """{LONG} (private)"""

        def short_fn():
            """Too short."""

        class Thing:
            """{LONG} (Thing)"""

            def method(self):
                """{LONG} (method)"""

            def _hidden(self):
                """{LONG} (hidden)"""

            def __init__(self):
                """{LONG} (dunder)"""

        if True:
            def conditional():
                """{LONG} (conditional)"""
        ''',
    )
    _write(root / "alpha" / "_internal.py", f'"""{LONG} (internal module)"""\n')
    _write(root / "alpha" / "broken.py", f'"""{LONG} (broken)"""\ndef oops(:\n')
    _write(root / "alpha" / "tests" / "helpers.py", f'"""{LONG} (tests dir)"""\n')
    _write(root / "alpha" / "test_alpha.py", f'"""{LONG} (test file)"""\n')
    _write(
        root / "beta.py",
        f'''
        """Beta module. {LONG}"""

        def same_text():
            """{LONG} (public_fn)"""

        def other():
            """{LONG} (other)"""
        ''',
    )
    _write(root / "epsilon.py", f'# licence\n__doc__ = """{LONG} (assigned)"""\n')
    _write(root / "_gamma.py", f'"""{LONG} (private top-level)"""\n')
    _write(root / "idlelib" / "__init__.py", f'"""{LONG} (idlelib)"""\n')
    _write(root / "alpha-1.0.dist-info" / "x.py", f'"""{LONG} (dist-info)"""\n')
    return root


def test_reads_public_docstrings_round_robin(fake_root: Path) -> None:
    docs = build_corpus(limit=100, roots=[fake_root])
    ids = [d["_id"] for d in docs]
    # Round-robin: each package's first document comes before any package's second.
    assert ids[:3] == ["alpha", "beta", "epsilon"]
    assert set(ids) == {"alpha", "alpha.public_fn", "alpha.Thing", "alpha.Thing.method", "alpha.conditional",
                        "beta", "beta.other", "epsilon"}  # fmt: skip
    assert "beta.same_text" not in ids  # same text as alpha.public_fn: a duplicate
    for doc in docs:
        assert set(doc) == FIELDS
        assert doc["title"] == doc["_id"]
        assert doc["package"] == doc["_id"].split(".")[0]
        assert len(doc["text"]) >= 80
        assert not any(part.startswith("_") for part in doc["_id"].split("."))


def test_docstrings_are_cleaned(fake_root: Path) -> None:
    _write(fake_root / "delta.py", f'"""First line.\n\n    Indented body. {LONG}\n    """\n')
    (doc,) = [d for d in build_corpus(limit=100, roots=[fake_root]) if d["_id"] == "delta"]
    assert doc["text"] == f"First line.\n\nIndented body. {LONG}"


def test_limit_is_respected(fake_root: Path) -> None:
    assert len(build_corpus(limit=3, roots=[fake_root])) == 3
    with pytest.raises(ValueError, match="limit"):
        build_corpus(limit=0, roots=[fake_root])


def test_installed_stdlib_corpus_is_deterministic_and_unique() -> None:
    stdlib = [Path(sysconfig.get_paths()["stdlib"])]
    first = build_corpus(limit=60, roots=stdlib)
    assert first == build_corpus(limit=60, roots=stdlib)
    assert len(first) == 60
    assert len({d["_id"] for d in first}) == len(first)
    assert len({d["text"] for d in first}) == len(first)
    assert all(set(d) == FIELDS for d in first)
    assert all(not part.startswith("_") for d in first for part in d["_id"].split("."))


def test_write_jsonl_round_trips(fake_root: Path, tmp_path: Path) -> None:
    docs = build_corpus(limit=100, roots=[fake_root])
    path = write_jsonl(docs, tmp_path / "out" / "corpus.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == docs
