"""--write-mode: the flag, and where bulk import is refused before any work starts."""

from __future__ import annotations

import pytest

from jobs.backfill import main, parse_config
from reembed.bulk import bulk_unsupported_reason
from reembed.errors import ConfigError


def test_bulk_is_refused_for_lite_and_old_servers_and_allowed_from_2_3_4():
    assert "Milvus Lite has no bulk import" in bulk_unsupported_reason(True, "milvus_lite-3.2.2")
    assert "cannot import Parquet" in bulk_unsupported_reason(False, "v2.3.3")
    assert bulk_unsupported_reason(False, "v2.3.5-lite") is None  # the `milvus` package's server
    assert bulk_unsupported_reason(False, "v2.6.4") is None


def test_write_mode_flag_parses_and_defaults_to_upsert(tmp_path):
    cfg = parse_config(["--input", "x.jsonl"])
    assert cfg.write_mode == "upsert" and cfg.bulk_dir is None
    cfg = parse_config(
        ["--input", "x.jsonl", "--milvus-uri", "http://m:19530", "--write-mode", "bulk", "--bulk-dir", str(tmp_path)]
    )
    assert cfg.write_mode == "bulk" and cfg.bulk_dir == str(tmp_path)


def test_bulk_with_a_lite_db_fails_at_config_load_naming_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="write_mode: bulk needs a Milvus server; Milvus Lite"):
        parse_config(["--input", "x.jsonl", "--milvus-uri", str(tmp_path / "a.db"), "--write-mode", "bulk"])
    # Through the CLI: exit 2 (input error) and the JSON error line, before reading any input.
    code = main(["--input", "missing.jsonl", "--milvus-uri", str(tmp_path / "a.db"), "--write-mode", "bulk"])
    assert code == 2
    assert "Milvus Lite" in capsys.readouterr().out
    assert not (tmp_path / "a.db").exists()
