import pytest

from reembed.filters import Clause, FilterError, compile_filter

FIELDS = {"id": "string", "partition": "string", "year": "number"}


def test_clauses_are_anded_and_strings_quoted():
    expr = compile_filter(
        [Clause("partition", "eq", "p_a"), Clause("year", "gte", 1990), Clause("id", "in", ["1", "2"])], FIELDS
    )
    assert expr == '(partition == "p_a") and (year >= 1990) and (id in ["1", "2"])'


def test_quotes_and_backslashes_stay_inside_the_literal():
    expr = compile_filter([Clause("id", "eq", 'x" or id != "y\\')], FIELDS)
    assert expr == r'(id == "x\" or id != \"y\\")'


def test_control_characters_are_escaped_not_refused():
    # An id may hold a newline or a tab: a filter must be able to name it (reembed.expr).
    assert compile_filter([Clause("id", "eq", "a\nb\tc\rd")], FIELDS) == r'(id == "a\nb\tc\rd")'


def test_empty_filter_is_empty_expression():
    assert compile_filter([], FIELDS) == ""


@pytest.mark.parametrize(
    ("clause", "field", "words"),
    [
        (Clause("nope", "eq", "a"), "filter[0].field", "unknown field"),
        (Clause("id", "like", "a%"), "filter[0].op", "unknown operator"),
        (Clause("id", "gt", "a"), "filter[0].op", "does not apply"),
        (Clause("id", "eq", 3), "filter[0].value", "expected a string"),
        (Clause("year", "eq", "1990"), "filter[0].value", "expected a number"),
        (Clause("year", "eq", True), "filter[0].value", "expected a number"),
        (Clause("id", "in", []), "filter[0].value", "non-empty list"),
        (Clause("id", "in", "a"), "filter[0].value", "non-empty list"),
        (Clause("id", "eq", "a\ud800b"), "filter[0].value", "not valid Unicode"),
        (Clause("id", "eq", "x" * 5000), "filter[0].value", "at most"),
    ],
)
def test_bad_clauses_name_the_field(clause, field, words):
    with pytest.raises(FilterError) as info:
        compile_filter([clause], FIELDS)
    assert info.value.field == field
    assert words in str(info.value)
