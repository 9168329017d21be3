import json

import pytest

from jobs.backfill import parse_config
from reembed.config import BackfillConfig, load_settings
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
