"""reembed.lite.LiteServer, the real `milvus-lite server`: it stops cleanly on its SIGINT even when the
process that starts it ignores SIGINT (a job run with `nohup ... &`), and keeps what was flushed."""

from __future__ import annotations

import signal

import pytest
from pymilvus import DataType, MilvusClient

from reembed.lite import LiteServer

pytestmark = pytest.mark.integration


def test_a_server_started_with_sigint_ignored_still_closes_on_sigint_and_keeps_its_rows(tmp_path):
    db = tmp_path / "x.db"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a script gives a job
    try:
        server = LiteServer(str(db), stop_timeout=30)
        with server as uri:
            process = server.process
            client = MilvusClient(uri)
            schema = client.create_schema(auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
            index = client.prepare_index_params()
            index.add_index("vector", index_type="FLAT", metric_type="IP")
            client.create_collection("docs", schema=schema, index_params=index)
            client.insert("docs", [{"id": i, "vector": [1.0, float(i), 0.0, 0.0]} for i in range(10)])
            client.flush("docs")
            client.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    # It ended by itself on SIGINT (a clean close), not killed after the stop timeout.
    assert process.returncode is not None and process.returncode != -signal.SIGKILL, process.returncode
    with LiteServer(str(db)) as uri:  # the next server on the same .db opens it and has every row
        client = MilvusClient(uri)
        client.load_collection("docs")
        assert len(client.query("docs", filter="id >= 0", output_fields=["id"], limit=100)) == 10
        client.close()


def test_a_db_this_process_opened_itself_is_refused_at_once_until_released(tmp_path):
    """pymilvus keeps an in-process Lite open until exit, even once its client is closed: the job
    cannot start a server on that .db, and says why at once instead of waiting out its start timeout."""
    import time

    from reembed.errors import StoreUnavailableError
    from reembed.lite import held_in_process, release_in_process

    db = tmp_path / "mine.db"
    MilvusClient(str(db)).close()
    assert held_in_process(db)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="is open in this process"), LiteServer(str(db)):
        pass
    assert time.monotonic() - started < 5
    release_in_process(db)
    assert not held_in_process(db)
    with LiteServer(str(db)) as uri:
        assert MilvusClient(uri).list_collections() == []
