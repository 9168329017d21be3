"""Run Milvus Lite as a local gRPC server so several processes (Ray actors) can share one .db.

Milvus Lite embedded runs inside the process that opens the .db folder; the backfill's actors are
other processes, so the job starts `milvus-lite server` on the .db folder, hands the actors its
loopback URI, flushes, and stops it at the end.
"""

from __future__ import annotations

import ctypes
import logging
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


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the process that started it dies.

    A driver killed with SIGKILL runs no clean-up; without this its server would live on, and a
    rerun would start a second server on the same .db. Writes since the last flush may then be
    lost, which the job's resume record allows for (a shard is recorded only after a flush).
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiteServer:
    """Context manager: `with LiteServer("./data/x.db") as uri:` gives http://127.0.0.1:PORT."""

    def __init__(self, db_path: str, start_timeout: float = 60.0, port: int | None = None) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        self.start_timeout = start_timeout
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
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [exe, "server", "--data-dir", str(self.db_path), "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
            )
        self.uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                lines = self.log_path.read_text(errors="replace").strip().splitlines()
                raise StoreUnavailableError(
                    f"milvus-lite server for {self.db_path} exited with {self.process.returncode}: "
                    f"{lines[-1] if lines else 'no output'} (log: {self.log_path})"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    logger.info("milvus-lite server for %s on %s", self.db_path, self.uri)
                    return self.uri
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise StoreUnavailableError(f"milvus-lite server for {self.db_path} did not start in {self.start_timeout}s")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
