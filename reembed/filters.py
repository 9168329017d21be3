"""Structured search filters -> one Milvus boolean expression, with every value escaped.

Sits between the service's HTTP boundary and Milvus: a client sends `(field, op, value)` clauses,
never an expression. Fields are checked against the collection's filterable scalar fields, values
against the field's type, and strings are quoted here, so nothing a client sends can change the
expression's structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reembed.errors import ReembedError
from reembed.expr import string_literal, unstorable

OPERATORS = {"eq": "==", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "in": "in", "not_in": "not in"}
MAX_IN_VALUES = 1024
MAX_STRING_CHARS = 1024


class FilterError(ReembedError):
    """A filter clause names an unknown field or operator, or carries a value of the wrong type."""

    is_input_error = True

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    value: Any


def quote_string(value: str, where: str) -> str:
    """A Milvus string literal for `value` (reembed.expr: read back exactly by Milvus Lite and the
    server, whatever the characters, so that a filter can name any id the job stored)."""
    if len(value) > MAX_STRING_CHARS:
        raise FilterError(where, f"expected at most {MAX_STRING_CHARS} characters, got {len(value)}")
    reason = unstorable(value)
    if reason:
        raise FilterError(where, f"not valid Unicode: {reason}")
    return string_literal(value)


def _literal(value: Any, kind: str, where: str) -> str:
    if kind == "string":
        if not isinstance(value, str):
            raise FilterError(where, f"expected a string, got {type(value).__name__}")
        return quote_string(value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterError(where, f"expected a number, got {type(value).__name__}")
    return repr(value)


def compile_filter(clauses: Sequence[Clause], fields: dict[str, str], prefix: str = "filter") -> str:
    """AND of the clauses as a Milvus expression. `fields` maps filterable field -> "string"/"number".

    Errors name the clause (`filter[1].value`), the expected and the actual value.
    """
    parts = []
    for i, clause in enumerate(clauses):
        where = f"{prefix}[{i}]"
        if clause.field not in fields:
            raise FilterError(f"{where}.field", f"unknown field {clause.field!r}; filterable: {sorted(fields)}")
        if clause.op not in OPERATORS:
            raise FilterError(f"{where}.op", f"unknown operator {clause.op!r}; expected one of {sorted(OPERATORS)}")
        kind = fields[clause.field]
        if clause.op in ("in", "not_in"):
            values = clause.value
            if not isinstance(values, list) or not values:
                raise FilterError(f"{where}.value", f"operator {clause.op!r} takes a non-empty list")
            if len(values) > MAX_IN_VALUES:
                raise FilterError(f"{where}.value", f"expected at most {MAX_IN_VALUES} values, got {len(values)}")
            literal = "[" + ", ".join(_literal(v, kind, f"{where}.value") for v in values) + "]"
        else:
            if kind == "string" and clause.op not in ("eq", "ne"):
                raise FilterError(
                    f"{where}.op", f"operator {clause.op!r} does not apply to string field {clause.field!r}"
                )
            literal = _literal(clause.value, kind, f"{where}.value")
        parts.append(f"({clause.field} {OPERATORS[clause.op]} {literal})")
    return " and ".join(parts)
