"""Batch size: found by a short probe, cached per model and device, halved on out-of-memory.

Used by reembed/embedder.py. `probe_batch_size` times encodes of a sample of the corpus's own
texts at growing batch sizes (start small, double while docs/s grows by more than `min_gain`,
stop at a cap, at the sample's size or at the time budget). An out-of-memory error halves the
size and retries the same texts, so nothing is lost; the embedder does the same during the run.
The size found is kept in a small JSON file keyed by model fingerprint, device name, dtype and
backend (`BatchSizeCache`), so the next actor, the next run, or the calibration pass skip the probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE_PATH = "~/.cache/reembed/batch_sizes.json"
CACHE_ENV = "REEMBED_BATCH_SIZE_CACHE"
# Below this relative gain in docs/s a doubling is not worth the memory.
MIN_GAIN = 0.05
PROBE_START = {"cpu": 8, "cuda": 32}
PROBE_CAP = {"cpu": 128, "cuda": 2048}
PROBE_BUDGET_S = 30.0


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's CUDA OOM and the RuntimeErrors other backends raise for the same thing."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # the probe logic is usable without torch
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def release_device_memory(device: str) -> None:
    """Give cached blocks back after an OOM so that the smaller retry can use them."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def device_name(device: str, threads: int | None = None) -> str:
    """What the batch size was measured on: the GPU's name, or the CPU model and torch threads."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} x{threads or 1} threads"


def weights_fingerprint(path: str | Path) -> str:
    """Cheap identity of a model folder's weights (names, sizes, mtimes), for cache keys only."""
    digest = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".onnx")):
        st = f.stat()
        digest.update(f"{f.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def cache_key(model: str, fingerprint: str, device: str, dtype: str, backend: str) -> str:
    return f"{model}@{fingerprint}|{device}|{dtype}|{backend}"


class BatchSizeCache:
    """A JSON file {key: batch size}. Written atomically; a damaged file counts as empty."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_PATH).expanduser()

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.items() if isinstance(v, int) and v > 0} if isinstance(data, dict) else {}

    def get(self, key: str) -> int | None:
        return self._read().get(key)

    def put(self, key: str, batch_size: int) -> None:
        data = self._read()
        data[key] = int(batch_size)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".batch_sizes.")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home must not fail the job: the probe just runs again
            logger.warning("cannot write the batch size cache %s: %s", self.path, exc)


@dataclass
class ProbeResult:
    """The size chosen and what was measured: (batch size, docs/s) per trial, sizes that ran out of memory."""

    batch_size: int
    trials: list[tuple[int, float]] = field(default_factory=list)
    out_of_memory: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "trials": [[b, round(r, 2)] for b, r in self.trials],
            "out_of_memory": self.out_of_memory,
            "seconds": round(self.seconds, 3),
        }


def probe_batch_size(
    encode: Callable[[int], None],
    docs: int,
    start: int = 8,
    cap: int = 1024,
    min_gain: float = MIN_GAIN,
    budget_s: float = PROBE_BUDGET_S,
    on_oom: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ProbeResult:
    """Find a batch size: `encode(b)` embeds the same `docs` sample texts with batch size b.

    Doubles b from `start` while docs/s grows by more than `min_gain`, up to `cap` (and the sample
    size: a batch larger than the sample measures nothing). An out-of-memory error halves b and
    retries the same texts; once a size has worked, the first OOM ends the search at the best size.
    """
    if docs < 1:
        raise ValueError(f"docs: expected a non-empty probe sample, got {docs}")
    cap = max(1, min(cap, docs))
    size = max(1, min(start, cap))
    result = ProbeResult(batch_size=size)
    best_rate = 0.0
    began = clock()
    while True:
        t = clock()
        try:
            encode(size)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            result.out_of_memory.append(size)
            if on_oom:
                on_oom()
            if result.trials or size == 1:
                if not result.trials:
                    raise
                break  # the last size that fitted stays the answer
            size //= 2
            result.batch_size = size
            continue
        elapsed = max(clock() - t, 1e-9)
        rate = docs / elapsed
        result.trials.append((size, rate))
        if rate > best_rate * (1 + min_gain):
            best_rate, result.batch_size = rate, size
        else:
            break
        if size >= cap or clock() - began > budget_s:
            break
        size = min(size * 2, cap)
    result.seconds = clock() - began
    return result


def run_with_backoff(
    items: Sequence[int],
    batch_size: int,
    run: Callable[[Sequence[int]], None],
    on_oom: Callable[[int], None] | None = None,
) -> int:
    """Call `run` on consecutive chunks of `items` of at most `batch_size`; returns the size in use at the end.

    An out-of-memory error halves the size and retries the same chunk, so every item is run exactly
    once and in order; `on_oom(new_size)` is told each time (to free device memory, to log, to
    update the cache). Below a size of 1 the error is raised: one text does not fit.
    """
    size = max(1, int(batch_size))
    start = 0
    while start < len(items):
        chunk = items[start : start + size]
        try:
            run(chunk)
        except Exception as exc:
            if not is_out_of_memory(exc) or size == 1:
                raise
            size = max(1, min(size, len(chunk)) // 2)
            logger.warning("out of memory at batch size %d: retrying the same texts at %d", len(chunk), size)
            if on_oom:
                on_oom(size)
            continue
        start += len(chunk)
    return size
