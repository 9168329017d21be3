"""Hypothesis strategies for the values users put in documents: ids, texts, partition values.

Shared by the property tests that push such values through Milvus expressions
(tests/integration/test_expr_roundtrip.py) and through the whole job
(tests/integration/test_ids_property.py). Plain text over all of Unicode finds few of the
characters that break parsers, so the tricky ones are drawn on purpose, often.
"""

from __future__ import annotations

from hypothesis import strategies as st

from reembed.store import ID_MAX_BYTES

# Everything Milvus can store: any code point but the surrogates (not valid Unicode on their own).
ANY_CHAR = st.characters(exclude_categories=("Cs",))

QUOTES = "'\"`\\"
# Control characters, among them the ones Python's str.splitlines() takes for line ends (\x0b \x0c
# \x1c-\x1e \x85) although JSONL ends lines with \n only, and DEL.
CONTROL = "\n\r\t\x00\x01\x07\x08\x0b\x0c\x1b\x1c\x1d\x1e\x1f\x7f\x85"
# Unicode spaces and line/paragraph separators (json.dumps(ensure_ascii=False) writes them raw).
SPACES = " \u00a0\u1680\u2009\u2028\u2029\u3000"
# Zero-width characters, BOM, directional marks and overrides: invisible, yet part of the id.
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u200e\u200f\u202a\u202e\u2066\u2069"
COMBINING = "\u0301\u0308\u0327\u0338\u20dd"
ACCENTED = "éÅçñøßĳǅ"
CJK = "日本語中文한국어カタカナ"
RTL = "שלוםمرحبا"
# Astral-plane characters (4 UTF-8 bytes, a surrogate pair in a JSON escape), a private-use
# character and the last code points of a plane and of Unicode.
ASTRAL = "😀🎉👍🏽𝔘𝕟𝕚\U0001f1ef\U0001f1f5\ue000\uffff\U0010ffff"
TRICKY_CHARS = QUOTES + CONTROL + SPACES + INVISIBLE + COMBINING + ACCENTED + CJK + RTL + ASTRAL

# Pieces that mean something to a Milvus expression, to JSON or to a format string.
EXPRESSION_FRAGMENTS = (
    "x'] or id not in ['z",
    'a" or id != "b',
    '"] or id in ["',
    '" or ""=="',
    "' or ''=='",
    ' || id != ""',
    " && ",
    "not ",
    "id",
    "==",
    "[",
    "]",
    "(",
    ")",
    "%",
    " like ",
    "\\",
    "\\\\",
    '\\"',
    "\\'",
    "\\n",
    "\\t",
    "\\u0041",
    "\\x41",
    "\\U0001F600",
    "\\0",
    "{0}",
    "${x}",
    "%s",
    "\u0000\u0000",
    "\r\n",
    "👨\u200d👩\u200d👧",
    "e\u0301",
    "null",
    "true",
    "",
)


def utf8_len(value: str) -> int:
    return len(value.encode("utf-8"))


def fill_to_bytes(core: str, filler: str, target: int) -> str:
    """`core` padded with copies of `filler`, then 'a's, to exactly `target` UTF-8 bytes (or cut to fit)."""
    data = core.encode("utf-8")[:target].decode("utf-8", errors="ignore")
    step = utf8_len(filler)
    while utf8_len(data) + step <= target:
        data += filler
    return data + "a" * (target - utf8_len(data))


_fragment = st.one_of(
    st.sampled_from(EXPRESSION_FRAGMENTS),
    st.text(st.sampled_from(TRICKY_CHARS), min_size=1, max_size=4),
    st.text(ANY_CHAR, min_size=1, max_size=3),
)
_assembled = st.lists(_fragment, min_size=1, max_size=8).map("".join)
# Values at or just under the byte limit, padded with 1-, 2-, 3- and 4-byte characters.
_at_the_limit = st.builds(
    fill_to_bytes,
    st.one_of(_assembled, st.text(ANY_CHAR, max_size=8)),
    st.sampled_from(["a", "é", "日", "😀", "\\", '"', "\x00"]),
    st.sampled_from([ID_MAX_BYTES, ID_MAX_BYTES - 1, ID_MAX_BYTES - 3]),
)


def ids(max_bytes: int = ID_MAX_BYTES) -> st.SearchStrategy[str]:
    """Any non-empty string Milvus can store as an id: mostly tricky, sometimes as long as allowed."""
    return st.one_of(
        st.text(ANY_CHAR, min_size=1, max_size=24),
        _assembled,
        _assembled,  # drawn twice as often: the pieces that break parsers
        _at_the_limit,
    ).filter(lambda s: s != "" and utf8_len(s) <= max_bytes)


def texts() -> st.SearchStrategy[str]:
    """Text field values: tricky Unicode, control characters (form feeds, tabs, NULs), padding."""
    padding = st.text(st.sampled_from(" \t\n\r\x0c\x0b\u00a0\u3000\x1c\x85\u2028"), max_size=3)
    core = st.one_of(
        st.text(ANY_CHAR, min_size=1, max_size=40),
        st.lists(_fragment, min_size=1, max_size=10).map("".join),
        st.sampled_from(["\x0c", "\t", "\x00", "😀", '"', "'", "\\", "\x0cform\x0cfeed\x0c", "tab\there"]),
    )
    return st.builds(lambda a, b, c: a + b + c, padding, core, padding)


# Partition field values: valid Milvus names as they are, others (spaces, quotes, hyphens, CJK,
# the reserved _default, an integer) that must be mapped to names of their own.
GROUPS = ("plain", "en-US", "en_US", "日本", "a b", "x'y", 'q"r', "_default", "Z9", 7)
