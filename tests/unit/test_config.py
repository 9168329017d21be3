import json

import pytest
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.backfill import parse_config
from reembed.config import BackfillConfig, EvaluateConfig, MigrateConfig, PlanConfig, ServiceConfig, load_settings
from reembed.errors import ConfigError


def test_precedence_flag_over_file_over_env_over_default(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"input": "f.jsonl", "collection": "from_file", "batch-size": 16}))
    monkeypatch.setenv("REEMBED_COLLECTION", "from_env")
    monkeypatch.setenv("REEMBED_HNSW_M", "48")
    cfg = parse_config(["--config", str(cfg_file), "--batch-size", "8"])
    assert cfg.batch_size == 8  # flag beats file
    assert cfg.collection == "from_file"  # file beats env
    assert cfg.hnsw_m == 48  # env beats default
    assert cfg.hnsw_ef_construction == 200  # default


def test_text_fields_accept_comma_list(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('input = "x"\ntext_fields = "body, abstract"\n')
    assert load_settings(BackfillConfig, {}, toml).text_fields == ["body", "abstract"]


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        ({"collection": "1bad-name"}, "collection"),
        ({"partitions": 0}, "partitions"),
        ({"precision": "int4"}, "precision"),
        ({"partition_by": "lang", "partitions": 3}, "exclusive"),
        ({"text_fields": ""}, "text_fields"),
        ({"unknown_option": 1}, "unknown_option"),
    ],
)
def test_bad_values_name_the_field(flags, field):
    with pytest.raises(ConfigError, match=field):
        load_settings(BackfillConfig, {"input": "x", **flags})


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file"):
        load_settings(BackfillConfig, {}, tmp_path / "nope.yaml")


def test_rerank_copies_go_with_codes_only_and_binary_implies_them():
    assert parse_config(["--input", "x.jsonl", "--precision", "binary"]).rerank is True
    assert parse_config(["--input", "x.jsonl", "--rerank"]).rerank is True
    assert parse_config(["--input", "x.jsonl"]).rerank is False
    with pytest.raises(ConfigError, match="rerank: float32 vectors are their own re-rank copies"):
        parse_config(["--input", "x.jsonl", "--precision", "float32", "--rerank"])
    with pytest.raises(ConfigError, match="rerank: bulk import does not stage re-rank copies"):
        parse_config(["--input", "x.jsonl", "--rerank", "--write-mode", "bulk", "--milvus-uri", "http://h:19530"])


# Every list setting of every settings class, a required value that makes the class build, and what
# `"a, b"`-style environment values become. pydantic-settings JSON-decodes list settings read from
# the environment unless told not to: a comma list used to fail there, with a SettingsError traceback.
def _beir(tmp_path):
    (tmp_path / "qrels").mkdir(exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (tmp_path / name).write_text("")
    return {"beir": str(tmp_path), "json_out": "r.json"}


LIST_SETTINGS = [
    # (class, env var, field, comma value, JSON value, expected, base values (tmp_path -> dict))
    (BackfillConfig, "REEMBED_TEXT_FIELDS", "text_fields", "title, text", '["title", "text"]', ["title", "text"],
     lambda tmp: {"input": "x"}),
    (ServiceConfig, "REEMBED_OUTPUT_FIELDS", "output_fields", "text", '["text"]', ["text"], lambda tmp: {}),
    (MigrateConfig, "REEMBED_TEXT_FIELDS", "text_fields", "body,abstract", '["body","abstract"]', ["body", "abstract"],
     lambda tmp: {"alias": "docs", "status": True}),
    (EvaluateConfig, "REEMBED_EVAL_SWEEP_M", "sweep_m", "8, 16", "[8, 16]", [8, 16], _beir),
    (EvaluateConfig, "REEMBED_EVAL_SWEEP_EF_CONSTRUCTION", "sweep_ef_construction", "64,200", "[64,200]", [64, 200],
     _beir),
    (EvaluateConfig, "REEMBED_EVAL_SWEEP_EF", "sweep_ef", "10", "[10]", [10], _beir),
    (PlanConfig, "REEMBED_PLAN_DOCS", "docs", "1M, 2_500_000", '["1M", 2500000]', [1_000_000, 2_500_000],
     lambda tmp: {"docs_per_s": 100.0}),
]  # fmt: skip


def test_every_list_setting_is_covered_here():
    """A list setting added later without StrList/IntList would be JSON-decoded from the environment."""
    covered = {(cls, field) for cls, _, field, *_ in LIST_SETTINGS}
    for cls in (BackfillConfig, ServiceConfig, EvaluateConfig, MigrateConfig, PlanConfig):
        for name, info in cls.model_fields.items():
            if "list" in str(info.annotation):
                assert (cls, name) in covered, f"{cls.__name__}.{name}: a list setting without an environment test"
                assert NoDecode in info.metadata, f"{cls.__name__}.{name}: expected NoDecode in its metadata"


@pytest.mark.parametrize(("cls", "env", "field", "comma", "as_json", "expected", "base"), LIST_SETTINGS)
def test_list_settings_read_comma_and_json_lists_from_the_environment(
    tmp_path, monkeypatch, cls, env, field, comma, as_json, expected, base
):
    values = base(tmp_path)
    monkeypatch.setenv(env, comma)
    assert getattr(load_settings(cls, values), field) == expected
    monkeypatch.setenv(env, as_json)
    assert getattr(load_settings(cls, values), field) == expected
    # A flag (a string, as argparse gives it) still beats the environment.
    flag = {"docs": "3K"}.get(field, comma.split(",")[0])
    got = getattr(load_settings(cls, {**values, field: flag}), field)
    assert got == ([3000] if field == "docs" else expected[:1])


@pytest.mark.parametrize(
    ("cls", "env", "value", "base", "message"),
    [
        (BackfillConfig, "REEMBED_TEXT_FIELDS", " , ", {"input": "x"}, "text_fields: expected at least one field"),
        (BackfillConfig, "REEMBED_TEXT_FIELDS", "[1, 2]", {"input": "x"}, r"text_fields\.0: Input should be a valid"),
        (BackfillConfig, "REEMBED_TEXT_FIELDS", '["title", " "]', {"input": "x"}, "none blank"),
        (BackfillConfig, "REEMBED_TEXT_FIELDS", "[title", {"input": "x"}, "text_fields: .*JSON list"),
        (ServiceConfig, "REEMBED_OUTPUT_FIELDS", '["text", ""]', {}, "output_fields: .*none blank"),
        (MigrateConfig, "REEMBED_TEXT_FIELDS", ",", {"alias": "docs", "status": True}, "text_fields: expected"),
        (EvaluateConfig, "REEMBED_EVAL_SWEEP_M", "8,x", None, r"sweep_m\.1: Input should be a valid integer"),
        (EvaluateConfig, "REEMBED_EVAL_SWEEP_M", "8,128", None, "sweep_m: expected HNSW M values in 4..64"),
        (EvaluateConfig, "REEMBED_EVAL_SWEEP_EF", "[]", None, "sweep_ef: .*expected values in 1..32768"),
        (PlanConfig, "REEMBED_PLAN_DOCS", "1M,lots", {"docs_per_s": 1.0}, "docs: expected counts like 1M"),
    ],
)
def test_bad_list_values_from_the_environment_are_config_errors_naming_the_field(
    tmp_path, monkeypatch, cls, env, value, base, message
):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(cls, _beir(tmp_path) if base is None else base)
    assert f"from {env}" in str(info.value)  # where to look


def test_a_bad_scalar_from_the_environment_names_its_variable(monkeypatch):
    monkeypatch.setenv("REEMBED_HNSW_M", "lots")
    with pytest.raises(ConfigError, match=r"hnsw_m: .*got 'lots', from REEMBED_HNSW_M"):
        load_settings(BackfillConfig, {"input": "x"})
    with pytest.raises(ConfigError, match=r"hnsw_m: .*got 'many'\)"):  # a flag's value: no variable named
        load_settings(BackfillConfig, {"input": "x", "hnsw_m": "many"})


def test_the_service_reads_its_list_from_the_environment_when_built_directly(monkeypatch):
    monkeypatch.setenv("REEMBED_OUTPUT_FIELDS", "text, partition, title")  # serve/app.py: ServiceConfig(**args)
    assert ServiceConfig().output_fields == ["text", "partition", "title"]


def test_a_value_pydantic_settings_cannot_decode_is_a_config_error(monkeypatch):
    """The fallback for a list setting declared without StrList/IntList: no traceback, the field named."""

    class Probe(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="REEMBED_PROBE_")
        names: list[str] = []

    monkeypatch.setenv("REEMBED_PROBE_NAMES", "a,b")
    with pytest.raises(ConfigError, match='invalid Probe: .*field "names"'):
        load_settings(Probe, {})
