"""HTTP request and response bodies of the search service.

Types and shapes are checked here by pydantic (unknown keys refused); bounds that depend on the
service's config (k, ef, query length, batch size) are checked by the ingress, which knows it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_validator

FilterValue = StrictStr | StrictInt | StrictFloat | list[StrictStr | StrictInt | StrictFloat]


class FilterClause(BaseModel):
    """One condition; clauses are ANDed. `op`: eq, ne, lt, lte, gt, gte, in, not_in."""

    model_config = ConfigDict(extra="forbid")

    field: StrictStr
    op: StrictStr = "eq"
    value: FilterValue


class SearchRequest(BaseModel):
    """`{"query": "..."}` or `{"queries": ["...", ...]}`, with optional k, ef, partitions, filter, fields."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr | None = None
    queries: list[StrictStr] | None = None
    k: StrictInt | None = None
    ef: StrictInt | None = None
    partitions: list[StrictStr] | None = None
    filter: list[FilterClause] | FilterClause | None = None
    fields: list[StrictStr] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> SearchRequest:
        if (self.query is None) == (self.queries is None):
            raise ValueError("give exactly one of `query` (a string) or `queries` (a list of strings)")
        return self

    def texts(self) -> list[str]:
        return [self.query] if self.query is not None else list(self.queries or [])

    def clauses(self) -> list[FilterClause]:
        if self.filter is None:
            return []
        return [self.filter] if isinstance(self.filter, FilterClause) else list(self.filter)


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of query and document")
    fields: dict[str, Any] = Field(default_factory=dict)


class Timing(BaseModel):
    embed: float
    search: float
    total: float


class SearchResponse(BaseModel):
    """`results` is a list of hits for `query`, a list of such lists for `queries`."""

    results: list[SearchHit] | list[list[SearchHit]]
    model: str
    model_key: str = Field(description="name@weights-hash/dimension of the model that embedded the query")
    collection: str = Field(description="the concrete collection searched (behind the alias)")
    k: int
    cache_hits: int
    timing_ms: Timing


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
