"""Milvus boolean expressions built from data: the one place that writes them.

Every expression the project sends to Milvus with a value from data in it (a document id, a
partition, a client's filter value) is built here, so that no value can change an expression's
structure. Values reach Milvus as string literals, never as raw text, and never through pymilvus'
`delete(ids=...)` / `get(ids=...)`, which wrap VARCHAR keys in quotes without escaping them.

The literal is the intersection of what both parsers read back exactly:
- Milvus Lite 3.x (milvus_lite/search/filter/tokens.py) knows the escapes \\" \\' \\\\ \\n \\r \\t
  only ("unknown escape sequence \\u" otherwise) and refuses a raw CR or LF inside a literal;
- the Milvus server (ANTLR grammar, then Go's strconv.Unquote) knows the C escapes, \\x, \\u and
  \\U as well, and also refuses a raw CR or LF.
So a literal is double-quoted, escapes exactly the backslash, the double quote, CR, LF and tab,
and carries every other character (any Unicode, other control characters, NUL) as it is. Proven
against both parsers by tests/integration/test_expr_roundtrip.py: every id hypothesis draws is
stored, then found again by `id == <literal>` and `id in [<literals>]`, and by nothing else.

The one thing no literal can carry is a string that is not valid Unicode (a lone surrogate from a
JSON escape such as "\\ud800"): gRPC sends UTF-8. Such values are refused here (`unstorable`),
and the job rejects those rows before they reach Milvus.
"""

from __future__ import annotations

from collections.abc import Iterable

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TABLE = str.maketrans(_ESCAPES)


def unstorable(value: str) -> str | None:
    """Why Milvus cannot store or match `value` as a VARCHAR (None if it can): a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {value[exc.start]!r} at character {exc.start} (not valid Unicode)"
    return None


def string_literal(value: str) -> str:
    """A Milvus string literal that both Milvus Lite and the Milvus server read back as `value`.

    Raises ValueError for a value that is not valid Unicode (see `unstorable`).
    """
    if not isinstance(value, str):
        raise TypeError(f"string_literal: expected a str, got {type(value).__name__}")
    reason = unstorable(value)
    if reason:
        raise ValueError(f"string_literal: {reason}")
    return '"' + value.translate(_TABLE) + '"'


def equals(field: str, value: str) -> str:
    """`field == "value"`."""
    return f"{field} == {string_literal(value)}"


def not_equals(field: str, value: str) -> str:
    """`field != "value"`."""
    return f"{field} != {string_literal(value)}"


def in_list(field: str, values: Iterable[str]) -> str:
    """`field in ["a", "b", ...]`; an empty list matches nothing."""
    return f"{field} in [{', '.join(string_literal(v) for v in values)}]"


def all_of(*parts: str) -> str:
    """The AND of non-empty expressions, each in parentheses."""
    return " and ".join(f"({p})" for p in parts if p)
