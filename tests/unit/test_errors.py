"""A failure's first line is its cause: reembed.errors.root_cause and the job's failure message."""

from __future__ import annotations

from types import SimpleNamespace

from jobs.backfill import _job_failure
from reembed.errors import InputDataError, ReembedError, root_cause

# The shape of the text Ray 2.60 gives a failed map_batches actor (taken from a real run): the remote
# traceback, the chain marker, Ray's wrapper and its retry advice last.
RAY_TEXT = (
    "\x1b[36mray::MapWorker(MapBatches(BatchWriter)).submit()\x1b[39m (pid=1, ip=10.0.0.1)\n"
    '  File "/x/concurrent/futures/_base.py", line 449, in result\n'
    "    return self.__get_result()\n"
    "           ^^^^^^^^^^^^^^^^^^^\n"
    '  File "/repo/reembed/ingest.py", line 5, in __call__\n'
    "    raise ValueError(msg)\n"
    "ValueError: shard /data/a.jsonl#0-4096: Milvus said no\n"
    "second line of the message\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::MapWorker(MapBatches(BatchWriter)).submit()\x1b[39m (pid=1)\n"
    "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    "To change retry attempts, backoff, or which errors are retried, configure `ray.data.DataContext`"
)


class RayLike(Exception):
    pass


def test_the_cause_is_the_exception_line_of_the_remote_traceback():
    assert root_cause(RayLike(RAY_TEXT)) == "ValueError: shard /data/a.jsonl#0-4096: Milvus said no"


def test_a_local_chain_gives_its_innermost_exception():
    try:
        try:
            raise KeyError("k")
        except KeyError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert root_cause(exc) == "KeyError: 'k'"
    assert root_cause(ValueError("first\nsecond")) == "ValueError: first"
    assert root_cause(ValueError()) == "ValueError"


def test_the_job_failure_starts_with_the_cause_and_names_the_shard():
    progress = SimpleNamespace(shards={"/data/a.jsonl#0-4096": None}, completed=set(), recorded=3)
    err = _job_failure(RayLike(RAY_TEXT), progress)
    assert isinstance(err, ReembedError)
    first = str(err).splitlines()[0]
    assert first.startswith("ValueError: shard /data/a.jsonl#0-4096: Milvus said no")
    assert "in BatchWriter" in first and "3 shard(s) finished and recorded" in first
    assert "retry attempts" not in str(err)


def test_without_a_shard_in_the_text_the_shards_in_flight_are_named():
    progress = SimpleNamespace(
        shards={"/d/a.jsonl#0-9": None, "/d/b.jsonl#0-9": None}, completed={"/d/a.jsonl#0-9"}, recorded=1
    )
    err = _job_failure(RayLike(RAY_TEXT.replace("shard /data/a.jsonl#0-4096: ", "")), progress)
    assert "1 shard(s) in flight, first /d/b.jsonl#0-9, in BatchWriter" in str(err)


def test_our_own_errors_pass_through_unchanged():
    own = InputDataError("shard x: cannot read: boom")
    assert _job_failure(own, SimpleNamespace(shards={}, completed=set(), recorded=0)) is own
