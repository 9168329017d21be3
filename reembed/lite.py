"""Run Milvus Lite as a local gRPC server so several processes (Ray actors) can share one .db.

Milvus Lite embedded runs inside the process that opens the .db folder; the backfill's actors are
other processes, so the job starts `milvus-lite server` on the .db folder, hands the actors its
loopback URI, flushes, and stops it at the end.

It is stopped with SIGINT, never SIGTERM: on SIGINT the server drains its requests and closes the
database, which waits for its background compaction and index builds. SIGTERM ends the process at
once, and one that lands while an index file is being written leaves a truncated `.idx` that the
next server fails to load (seen here: "read error in ...vector.hnsw.idx: 3946 != 23040").
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from reembed.errors import ConfigError, StoreUnavailableError

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def is_lite_uri(uri: str) -> bool:
    return uri.endswith(".db") and "://" not in uri


def _prepare_child() -> None:
    """In the child, before exec: make SIGINT (the clean close) work, and send it when the parent dies.

    A process started in the background by a non-interactive shell (`nohup python -m jobs.backfill
    ... &`, or `cmd &` in a script) has SIGINT ignored, and exec keeps that: Python then installs no
    handler, and the server would sit out every SIGINT the job sends it (seen here: the job waited
    on it until its stop timeout). So SIGINT goes back to its default first.

    A driver killed with SIGKILL runs no clean-up; without the parent-death signal its server would
    live on, and a rerun would start a second server on the same .db. Writes since the last flush
    may then be lost, which the job's resume record allows for (a shard is recorded only after a flush).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform == "linux":
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process_servers() -> dict:
    """Milvus Lite databases this process opened itself (a MilvusClient on a .db path), by path."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return {}
    return getattr(server_manager_instance, "_servers", {})


def _held_key(db_path: str | Path) -> str | None:
    """The key this process's own Milvus Lite holds the .db under (milvus-lite keys by abspath,
    which keeps symlinks), or None."""
    servers = _in_process_servers()
    path = Path(db_path).expanduser()
    for key in (os.path.abspath(path), str(path.resolve())):
        if key in servers:
            return key
    return None


def held_in_process(db_path: str | Path) -> bool:
    """Whether this process holds the .db: pymilvus keeps an in-process Lite open until exit,
    even after every client on it is closed."""
    return _held_key(db_path) is not None


def release_in_process(db_path: str | Path) -> None:
    """Close this process's own Milvus Lite on the .db (its clients must be closed first)."""
    key = _held_key(db_path)
    if key is not None:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(key)


class LiteServer:
    """Context manager: `with LiteServer("./data/x.db") as uri:` gives http://127.0.0.1:PORT."""

    def __init__(
        self, db_path: str, start_timeout: float = 60.0, port: int | None = None, stop_timeout: float = 600.0
    ) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = port
        self.process: subprocess.Popen | None = None
        self.uri = ""

    def __enter__(self) -> str:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        port = self.port or _free_port()
        self.port = port  # a restart reuses it, so clients reconnect to the same URI
        exe = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
        if not Path(exe).exists():
            raise ConfigError("milvus_uri: a .db URI needs the milvus-lite package (pip install milvus-lite)")
        self.log_path = self.db_path.parent / f"{self.db_path.name}.server.log"
        self.uri = f"http://127.0.0.1:{port}"
        if held_in_process(self.db_path):
            # Waiting would not help: the lock is this process's own until it exits.
            raise StoreUnavailableError(
                f"milvus_uri: {self.db_path} is open in this process (a MilvusClient on the .db path keeps it "
                "until the process exits, even once closed); close its clients and call "
                "reembed.lite.release_in_process(path), or run the job in its own process"
            )
        deadline = time.monotonic() + self.start_timeout
        locked = ""
        while True:
            self._spawn(exe, port)
            failure = self._wait_until_listening(port, deadline)
            if failure is None:
                logger.info("milvus-lite server for %s on %s", self.db_path, self.uri)
                return self.uri
            # A server that is still closing the same .db (a killed driver's, told to stop) holds
            # its lock for as long as its last flush and index builds take: wait for it.
            if "DataDirLockedError" in failure and time.monotonic() < deadline:
                logger.info("%s is still held by a closing Milvus Lite server; waiting", self.db_path)
                locked = failure
                time.sleep(1.0)
                continue
            if locked and failure.startswith("did not start"):
                failure += f"; the last try said: {locked}"
            self.__exit__(None, None, None)
            raise StoreUnavailableError(f"milvus-lite server for {self.db_path}: {failure} (log: {self.log_path})")

    def _spawn(self, exe: str, port: int) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [exe, "server", "--data-dir", str(self.db_path), "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal reaches the driver, which stops it cleanly.
                start_new_session=True,
                preexec_fn=_prepare_child,
            )

    def _wait_until_listening(self, port: int, deadline: float) -> str | None:
        """None once the port accepts connections; otherwise why not."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(self.log_path, "rb") as fh:
                    fh.seek(self._log_offset)
                    text = fh.read().decode(errors="replace")
                lines = text.strip().splitlines()
                return f"exited with {self.process.returncode}: " + (
                    next((ln for ln in reversed(lines) if "Error" in ln), lines[-1]) if lines else "no output"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return None
            except OSError:
                time.sleep(0.2)
        return f"did not start in {self.start_timeout}s"

    def __exit__(self, *exc: object) -> None:
        """Stop the server cleanly: SIGINT, then wait while it closes the database."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.info("waiting for the Milvus Lite server to finish its index builds and close %s", self.db_path)
                try:
                    self.process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "the Milvus Lite server did not close %s in %.0fs; killing it (flushed rows are kept; "
                        "an index file it was writing may need deleting)",
                        self.db_path,
                        self.stop_timeout,
                    )
                    self.process.kill()
                    self.process.wait()
        self.process = None
