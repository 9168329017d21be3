"""Backfill throughput against plain `SentenceTransformer.encode`: same documents, same model, one run.

Sits beside the job, not in its flow: it runs `python -m jobs.backfill` as a user would (a fresh
subprocess, a fresh Milvus Lite .db, a local Ray of its own) and, in another fresh subprocess,
encodes exactly the texts the job embeds with `SentenceTransformer(path).encode(texts, batch_size=32)`
on the same model folder, with as many torch threads as the job's embedding actors get cores.

Start-up is separated from steady state the same way on both sides, by a differential: each side
is timed on N1 and on N2 > N1 documents (the first N1 and N2 good documents of the input), then

    steady docs/s = (N2 - N1) / (t2 - t1)        start-up = t1 - N1 / steady

Everything that does not grow with the documents (interpreter and imports, Ray start, Milvus Lite
start, model loads, the int8 calibration pass, shutdown) cancels in t2 - t1 and lands in start-up.
The job's t is the wall time of its process less the time it took to start its local Ray, which
the job reports (`ray_start_seconds`): a retried Ray start on a loaded machine took 31 s here, and
in one run's t it would skew the difference; the median Ray start is added back to the job's
start-up and whole-run figures. The baseline's t is the wall time from its process launch to the
end of model load + a short warm-up, plus the encode time of N documents (both encodes run warm
in one process after one model load). Whole-run docs/s is N2 / t2 on each side.

The differential holds only while time grows linearly with N. The job hands each CPU embedding
actor `ComputePlan.rows_per_call` rows a call, so the default N2 is the whole input but at least two
full calls per core, and N1 half of it (past the end of the input, documents repeat under new ids). The result
says `trustworthy: false` and gives `meets_target: null`, with its reasons under `doubts`, when the
sizes are too small for that, a start-up comes out negative, or other processes took more than
10% of the CPUs during a run (`foreign_cpu_fraction`, from /proc/stat less our own children).

Prints progress to stderr and one JSON object as the last line of stdout:

    python benchmarks/backfill_throughput.py                  # the whole input: 699 and 1,398 Cranfield documents
    python benchmarks/backfill_throughput.py --docs 600       # quicker, but flagged as untrustworthy
    python benchmarks/backfill_throughput.py --repeats 3 --out benchmarks/out/backfill.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.backfill_throughput")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = "/work/shared/data/cranfield/corpus.jsonl"
TARGET_RATIO = 0.95
# sentence-transformers' own default: "plain encode" means what a user gets without tuning.
BASELINE_BATCH_SIZE = 32
# Small, and the same for both job runs: the calibration pass is start-up, not steady state.
DEFAULT_CALIBRATION_SAMPLE = 64
# The baseline encodes this many texts once after loading, so neither timed encode pays the
# first-call costs (allocator, oneDNN kernel selection); the job pays them in both runs, where
# they cancel in the differential.
WARMUP_TEXTS = 32
COLLECTION = "bench_backfill"
# Above this share of the CPUs taken by other processes during a run, the timings are not trusted.
MAX_FOREIGN_CPU = 0.10
MARKER_ENV = "REEMBED_BENCHMARK_RUN"
QUIET_CHECK_S = 3.0
# The same model on the same cores cannot run much faster inside the job than in plain encode;
# a steady ratio above this says the differential broke, not that the job is fast.
MAX_PLAUSIBLE_RATIO = 1.25
TERMINATE_GRACE_S = 60.0
MAX_LOG_LINES = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/backfill_throughput.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", default=DEFAULT_INPUT, help="JSONL file of documents (default: cranfield corpus)")
    p.add_argument(
        "--docs",
        type=int,
        default=None,
        help="documents in the large run (default: the whole input; more repeats it under new ids); "
        "the small run gets half",
    )
    p.add_argument("--small-docs", type=int, default=None, help="documents in the small run (default: half)")
    p.add_argument("--model", default=None, help="hub name or local path (default: the job's default model)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="passed to the job; the baseline resolves it the same way (default auto)",
    )
    p.add_argument("--id-field", default="_id")
    p.add_argument("--text-fields", default="title,text", help="comma-separated, as the job takes them")
    p.add_argument(
        "--calibration-sample",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLE,
        help="the job's int8 calibration sample, the same in both job runs (default %(default)s)",
    )
    p.add_argument(
        "--job-args",
        default="",
        help='extra flags for the job, one shell-quoted string, e.g. "--batch-size 32 --writers 1"',
    )
    p.add_argument("--baseline-batch-size", type=int, default=BASELINE_BATCH_SIZE)
    p.add_argument(
        "--baseline-threads",
        type=int,
        default=None,
        help="torch threads for plain encode (default: the cores the job's actors get in total)",
    )
    p.add_argument("--repeats", type=int, default=1, help="measure each side this many times; medians are used")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for one subprocess")
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep inputs, Milvus .db, job logs and Ray logs here (default: a temp dir, removed)",
    )
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--baseline-worker", default=None, help=argparse.SUPPRESS)
    return p


# --- the baseline, in its own process -------------------------------------------------------


def baseline_worker(spec_path: str) -> int:
    """Fresh process: import, load once, warm up, then time encode(N1 texts) and encode(N2 texts)."""
    spec = json.loads(Path(spec_path).read_text())
    texts: list[str] = json.loads(Path(spec["texts_path"]).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from sentence_transformers import SentenceTransformer

    device = spec["device"]
    if device == "auto":  # as reembed.embedder.pick_device resolves it
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(spec["model_path"], device=device)
    loaded_at = time.time()
    # The job's embedder prepends the model's "document" prompt when it has one; so must we.
    prompt = (getattr(model, "prompts", None) or {}).get("document") or None
    batch_size = spec["batch_size"]
    model.encode(texts[:WARMUP_TEXTS], batch_size=batch_size, prompt=prompt)
    warm_at = time.time()
    encode_s = {}
    dimension = 0
    for n in spec["sizes"]:
        t = time.perf_counter()
        emb = model.encode(texts[:n], batch_size=batch_size, prompt=prompt)
        if device == "cuda":
            torch.cuda.synchronize()
        encode_s[str(n)] = time.perf_counter() - t
        dimension = int(emb.shape[1])
    print(
        json.dumps(
            {
                "device": device,
                "torch_threads": torch.get_num_threads(),
                "prompt": prompt,
                "dimension": dimension,
                "load_at": loaded_at,
                "warm_at": warm_at,
                "encode_s": encode_s,
            }
        ),
        flush=True,
    )
    return 0


# --- inputs ----------------------------------------------------------------------------------


def select_documents(
    path: Path, id_field: str, text_fields: list[str], limit: int | None
) -> tuple[list[str], list[str], int]:
    """The first `limit` input lines the job would embed, the texts it would embed for them, and
    how many distinct documents the input had.

    Lines the job would reject (bad JSON, missing id or text) and repeated ids are left out, so
    both sides see exactly N documents and the job writes all of them. Past the end of the input
    the documents repeat under new ids ("<id>~<k>"), so that a small corpus can still give each
    of the job's actors many batches; both sides then embed the same repeated texts.
    """
    from reembed.documents import C_REJECT, C_TEXT, DocumentSpec, normalize_record

    spec = DocumentSpec(id_field, tuple(text_fields))
    lines: list[str] = []
    records: list[dict[str, Any]] = []
    texts: list[str] = []
    seen: set[str] = set()
    skipped = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(lines) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            row = normalize_record(record, str(path), line, spec)
            if row[C_REJECT] or row["id"] in seen:
                skipped += 1
                continue
            seen.add(row["id"])
            lines.append(line.rstrip("\n"))
            records.append(record)
            texts.append(row[C_TEXT])
    if skipped:
        logger.warning("left out %d input lines the job would reject (bad record or repeated id)", skipped)
    if not lines:
        raise SystemExit(f"--input: no document in {str(path)!r} that the job would embed")
    available = len(lines)
    copy = 0
    while limit is not None and len(lines) < limit:
        copy, i = divmod(len(lines), available)
        record = dict(records[i])
        record[id_field] = f"{record[id_field]}~{copy}"
        lines.append(json.dumps(record, ensure_ascii=False))
        texts.append(texts[i])
    if copy:
        logger.info("the input has %d documents: repeated them under new ids up to %d", available, len(lines))
    return lines, texts, available


# --- running the two sides ---------------------------------------------------------------------


def child_env(ray_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    # A local Ray of our own: no RAY_ADDRESS (this measures this machine), and a temp dir of our
    # own so that neither another Ray on the host nor its session_latest link gets mixed in.
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = str(ray_tmp)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env[MARKER_ENV] = uuid.uuid4().hex  # finds our processes again, see CpuMeter
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


class CpuMeter:
    """How much of the CPUs other processes took while one of our children ran.

    All CPUs' busy time from /proc/stat, less our own: every process that carries our marker in
    its environment (the child, the job's Ray workers and Milvus Lite inherit it), sampled from
    /proc every SAMPLE_S while it runs, plus this process itself; over wall time x CPUs. Near 0
    on a quiet machine. Approximate: CPU a process of ours spends in its last SAMPLE_S counts
    as foreign, so it errs towards doubt.
    """

    SAMPLE_S = 0.5

    def __init__(self, marker: str) -> None:
        self.marker = f"{MARKER_ENV}={marker}".encode()
        self.ours: dict[int, int] = {}  # pid -> utime + stime ticks, last seen
        self.checked: dict[int, bool] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self.busy0 = self._busy_s()
        self.self0 = self._self_s()
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample_loop, daemon=True)
        self.thread.start()

    def _busy_s(self) -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        # user nice system idle iowait irq softirq steal (guest is already inside user)
        return (sum(fields[:8]) - idle) / self.tick

    @staticmethod
    def _self_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def _sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                if pid not in self.checked:
                    self.checked[pid] = self.marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if self.checked[pid]:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    self.ours[pid] = int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, ValueError, IndexError):
                continue

    def _sample_loop(self) -> None:
        while not self.stop.wait(self.SAMPLE_S):
            self._sample()

    def foreign_fraction(self) -> float | None:
        self.stop.set()
        self.thread.join()
        busy1 = self._busy_s()
        if self.busy0 is None or busy1 is None:
            return None
        ours = sum(self.ours.values()) / self.tick + self._self_s() - self.self0
        capacity = (time.monotonic() - self.t0) * (os.cpu_count() or 1)
        return round(max(0.0, (busy1 - self.busy0 - ours) / capacity), 3) if capacity > 0 else None


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, str, float]:
    """Run a command (stderr to log_path); returns (exit code, stdout, wall seconds launch -> exit).

    On timeout the child gets SIGTERM first, so the job can stop its Ray and Milvus Lite, then
    its whole process group gets SIGKILL.
    """
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.error("%s ran past %.0fs: stopping it; see %s", cmd[:3], timeout, log_path)
            proc.terminate()
            try:
                proc.communicate(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            raise RuntimeError(f"timed out after {timeout:.0f}s; log {log_path}:\n{_tail(log_path)}") from None
        return proc.returncode, stdout, time.monotonic() - started


def run_job(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[float, dict[str, Any]]:
    """Run the job as a user would; returns (wall seconds launch -> exit, its JSON summary)."""
    logger.info("job: %s", shlex.join(cmd))
    code, stdout, wall = run_child(cmd, env, log_path, timeout)
    summary = _last_json_line(stdout)
    if code != 0 or summary is None or "error" in summary:
        raise RuntimeError(f"job failed (exit {code}, summary {summary}); log {log_path}:\n{_tail(log_path)}")
    return wall, summary


def run_baseline(spec: dict[str, Any], work: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    spec_path = work / "baseline_spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / "baseline.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(spec_path)]
    logger.info(
        "baseline: encode %s texts, batch_size=%d, %s torch threads",
        " then ".join(map(str, spec["sizes"])),
        spec["batch_size"],
        spec["threads"] or "default",
    )
    launched = time.time()
    code, stdout, _ = run_child(cmd, env, log_path, timeout)
    result = _last_json_line(stdout)
    if code != 0 or result is None:
        raise RuntimeError(f"baseline failed (exit {code}); log {log_path}:\n{_tail(log_path)}")
    result["load_s"] = result["load_at"] - launched
    result["warmup_s"] = result["warm_at"] - result["load_at"]
    # Launch -> model loaded and warm: what a fresh process pays before its first real document.
    result["ready_s"] = result["warm_at"] - launched
    return result


# Ray prefixes a worker's output with "(<name> pid=<pid>)"; a fatal signal shows up like this.
_WORKER_CRASH_RE = re.compile(r"\((\S.*?) pid=(\d+)\).*?(SIGSEGV|SIGABRT|SIGBUS|Fatal Python error)")


def _operator_names(plan: str) -> str:
    """'InputDataBuffer[Input] -> TaskPoolMapOperator[ReadText] -> ...' -> 'Input -> ReadText -> ...'."""
    names = []
    for op in plan.split(" -> "):
        inner = op[op.find("[") + 1 : op.rfind("]")] if "[" in op else op
        names.append(inner.split("(key_columns")[0])
    return " -> ".join(names)


def ray_data_digest(ray_tmp: Path, seen_sessions: set[str], job_log: Path) -> dict[str, Any]:
    """What the job's Ray session says about itself: each dataset pass with its duration, and crashes.

    The job runs several Ray Data passes (duplicate-id check, int8 calibration sample, the
    backfill itself); their durations show where start-up goes. Workers that die with a signal
    are counted from the job's log, since the job itself succeeds without them.
    """
    sessions = sorted(
        (p for p in (ray_tmp / "ray").glob("session_2*") if p.name not in seen_sessions),
        key=lambda p: p.stat().st_mtime,
    )
    if not sessions:
        return {}
    session = sessions[-1]
    seen_sessions.add(session.name)
    log_dir = session / "logs" / "ray-data"
    plans: dict[str, str] = {}
    passes: list[dict[str, Any]] = []
    warnings: list[str] = []
    log = log_dir / "ray-data.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    embed_stats: dict[str, Any] | None = None
    for k, line in enumerate(lines):
        message = line.split(" -- ", 1)[-1].strip()
        if "MapBatches(DocumentEncoder)] completed" in message and k + 1 < len(lines):
            # How the rows reached the embedding actors: few big tasks leave actors idle.
            metrics = lines[k + 1]
            tasks = re.search(r"'num_tasks_finished': (\d+)", metrics)
            rows = re.search(r"'average_rows_inputs_per_task': ([\d.]+)", metrics)
            spread = re.search(r"'op_task_duration_stats': \{[^}]*'min': ([\d.]+), 'max': ([\d.]+)", metrics)
            embed_stats = {
                "embed_tasks": int(tasks.group(1)) if tasks else None,
                "rows_per_embed_task": float(rows.group(1)) if rows else None,
                "embed_task_s_min_max": [round(float(spread.group(1)), 2), round(float(spread.group(2)), 2)]
                if spread
                else None,
            }
        elif message.startswith("Execution plan of Dataset "):
            dataset, _, plan = message[len("Execution plan of Dataset ") :].partition(": ")
            plans[dataset] = _operator_names(plan)
        elif " execution finished in " in message:
            dataset = message.split("Dataset ", 1)[-1].split(" ", 1)[0]
            seconds = float(message.rsplit(" in ", 1)[-1].split()[0])
            passes.append({"plan": plans.get(dataset, dataset), "seconds": seconds, **(embed_stats or {})})
            embed_stats = None
        elif (
            ("WARNING" in line or "ERROR" in line)
            and "Progress bars disabled" not in message  # the job turns them off when not on a TTY
            and message[:300] not in warnings
            and len(warnings) < MAX_LOG_LINES
        ):
            warnings.append(message[:300])
    job_text = job_log.read_text(errors="replace") if job_log.exists() else ""
    crashes: dict[str, str] = {}
    for m in _WORKER_CRASH_RE.finditer(job_text):
        worker = f"{m.group(1)} pid={m.group(2)}"
        if crashes.get(worker, "Fatal Python error") == "Fatal Python error":  # keep the signal's name
            crashes[worker] = m.group(3)
    return {
        "ray_data_passes": passes,
        "ray_data_warnings": warnings,
        "worker_crashes": [f"{w}: {sig}" for w, sig in list(crashes.items())[:MAX_LOG_LINES]],
        "ray_data_logs": str(log_dir),
    }


# --- arithmetic -------------------------------------------------------------------------------


def differential(n1: int, t1: float, n2: int, t2: float) -> tuple[float | None, float | None]:
    """(steady docs/s, start-up seconds) from two timed runs; None where the runs cannot tell."""
    if t2 <= t1:
        return None, None
    steady = (n2 - n1) / (t2 - t1)
    return steady, t1 - n1 / steady


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def side_summary(n1: int, n2: int, times1: list[float], times2: list[float], fixed_s: float = 0.0) -> dict[str, Any]:
    """Steady state from the differential of the times; `fixed_s` (start-up kept out of the times,
    e.g. the job's Ray start) is added back to start-up and to the whole-run figures."""
    t1, t2 = statistics.median(times1), statistics.median(times2)
    steady, startup = differential(n1, t1, n2, t2)
    t1, t2 = t1 + fixed_s, t2 + fixed_s
    return {
        "seconds": _r(t2),
        "docs_per_s": _r(n2 / t2, 2),
        "steady_docs_per_s": _r(steady, 2),
        "startup_s": _r(None if startup is None else startup + fixed_s),
        "seconds_small": _r(t1),
        "docs_per_s_small": _r(n1 / t1, 2),
    }


def _command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- main --------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if str(REPO_ROOT) not in sys.path:  # run as a file, the repo's packages must still import
        sys.path.insert(0, str(REPO_ROOT))
    from jobs.backfill import parse_config
    from reembed.embedder import resolve_model
    from reembed.errors import ReembedError

    job_extra = shlex.split(args.job_args)
    text_fields = [f.strip() for f in args.text_fields.split(",") if f.strip()]

    def job_argv(input_path: str, run_dir: Path) -> list[str]:
        argv = [
            "--input",
            input_path,
            "--id-field",
            args.id_field,
            "--text-fields",
            ",".join(text_fields),
            "--device",
            args.device,
            "--calibration-sample",
            str(args.calibration_sample),
            "--milvus-uri",
            str(run_dir / "milvus.db"),
            "--collection",
            COLLECTION,
            "--output-dir",
            str(run_dir / "runs"),
        ]
        if args.model:
            argv += ["--model", args.model]
        return argv + job_extra

    # Validate the job's flags here, before any minute is spent, and learn its effective settings.
    try:
        cfg = parse_config(job_argv(args.input, work / "check"))
    except ReembedError as exc:
        raise SystemExit(f"the job rejects these settings: {exc}") from None
    cpus = os.cpu_count() or 1
    from jobs.pipeline import rows_per_call as job_rows_per_call

    rows_per_call = job_rows_per_call(cfg.batch_size, "cpu")  # what a CPU embedding actor gets a call
    # Default sizes: the whole input, and at least enough that the small run gives every core's
    # worth of actors one full call and the large run two, so both runs keep all actors busy and the
    # difference is throughput, not how rows split.
    lines, texts, available = select_documents(Path(args.input), args.id_field, text_fields, args.docs)
    minimum = 2 * cpus * rows_per_call
    if not args.docs and len(lines) < minimum:
        lines, texts, available = select_documents(Path(args.input), args.id_field, text_fields, minimum)
    n2 = len(lines)
    n1 = args.small_docs if args.small_docs is not None else n2 // 2
    if not 0 < n1 < n2:
        raise SystemExit(f"--small-docs: expected 0 < small < {n2} (the documents available), got {n1}")
    if cfg.precision == "int8" and cfg.calibration_sample > n1:
        # Both job runs must fit the same calibration sample, or its cost would leak into "steady".
        raise SystemExit(
            f"--calibration-sample: expected at most {n1} (the small run's documents), got {cfg.calibration_sample}"
        )
    logger.info("%d documents: runs on %d and %d", n2, n1, n2)

    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    subsets = {}
    for n in (n1, n2):
        subsets[n] = inputs / f"docs_{n}.jsonl"
        subsets[n].write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    texts_path = inputs / "texts.json"
    texts_path.write_text(json.dumps(texts, ensure_ascii=False))

    source = resolve_model(cfg.model)
    cpus = os.cpu_count() or 1
    # The plain encode gets the cores the job's embedding actors get in total. By default the job
    # plans its CPU actors to fill the machine (however it splits them into actors and threads),
    # so that is every core; with both --actors and --threads-per-actor given it is their product.
    if args.baseline_threads:
        baseline_threads = args.baseline_threads
    elif cfg.actors and cfg.threads_per_actor:
        baseline_threads = min(cpus, cfg.actors * cfg.threads_per_actor)
    else:
        baseline_threads = cpus

    ray_tmp = work / "rt"
    ray_tmp.mkdir(exist_ok=True)
    env = child_env(ray_tmp)
    baseline_spec = {
        "texts_path": str(texts_path),
        "model_path": source.path,
        "sizes": [n1, n2],
        "batch_size": args.baseline_batch_size,
        "threads": baseline_threads,
        "device": args.device,
    }
    loadavg_before = _loadavg()
    idle_meter = CpuMeter(env[MARKER_ENV])
    time.sleep(QUIET_CHECK_S)
    foreign_before = idle_meter.foreign_fraction()
    if foreign_before is not None and foreign_before > MAX_FOREIGN_CPU:
        logger.warning("other processes already use %.0f%% of the CPUs: expect noisy timings", 100 * foreign_before)
    base_t: dict[int, list[float]] = {n1: [], n2: []}
    job_t: dict[int, list[float]] = {n1: [], n2: []}
    ray_starts: list[float] = []
    job_runs: list[dict[str, Any]] = []
    baseline_runs: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    seen_sessions: set[str] = set()
    for rep in range(args.repeats):
        logger.info("repeat %d/%d", rep + 1, args.repeats)
        meter = CpuMeter(env[MARKER_ENV])
        base = run_baseline(baseline_spec, work, env, args.timeout)
        base["foreign_cpu_fraction"] = meter.foreign_fraction()
        for n in (n1, n2):
            base_t[n].append(base["ready_s"] + base["encode_s"][str(n)])
        baseline_runs.append(
            {k: (_r(v) if isinstance(v, float) else v) for k, v in base.items() if k not in ("load_at", "warm_at")}
        )
        baseline_runs[-1]["encode_s"] = {k: _r(v) for k, v in base["encode_s"].items()}
        baseline_runs[-1]["loadavg_1m_after"] = (_loadavg() or [None])[0]
        logger.info(
            "baseline: ready %.1fs, encode %d in %.1fs, %d in %.1fs",
            base["ready_s"],
            n1,
            base["encode_s"][str(n1)],
            n2,
            base["encode_s"][str(n2)],
        )
        # Alternate the order across repeats, so a machine whose load drifts does not always
        # favour the same size.
        for n in (n1, n2) if rep % 2 == 0 else (n2, n1):
            run_dir = work / f"job_r{rep}_n{n}"  # a fresh Milvus Lite .db each run
            run_dir.mkdir()
            cmd = [sys.executable, "-m", "jobs.backfill", *job_argv(str(subsets[n]), run_dir)]
            commands[f"job_{n}"] = shlex.join(cmd)
            meter = CpuMeter(env[MARKER_ENV])
            wall, summary = run_job(cmd, env, run_dir / "job.log", args.timeout)
            foreign = meter.foreign_fraction()
            if summary.get("written") != n:
                raise RuntimeError(f"job wrote {summary.get('written')} of {n} documents; see {run_dir / 'job.log'}")
            # Starting a local Ray does not grow with the documents but varies a lot on a loaded
            # machine (a retried start took 31 s here): it is taken out of the differential and
            # added back to the job's start-up below.
            ray_start = float(summary.get("ray_start_seconds") or 0.0)
            job_t[n].append(wall - ray_start)
            ray_starts.append(ray_start)
            run = {
                "docs": n,
                "wall_s": _r(wall),
                "job_seconds": summary.get("seconds"),
                "job_startup_seconds": summary.get("startup_seconds"),
                "ray_start_seconds": summary.get("ray_start_seconds"),
                "job_docs_per_s": summary.get("docs_per_s"),
                "calibration_s": (summary.get("calibration") or {}).get("seconds")
                if isinstance(summary.get("calibration"), dict)
                else None,
                "actors": summary.get("actors"),
                "threads_per_actor": summary.get("threads_per_actor", cfg.threads_per_actor),
                "cpus_per_actor": summary.get("cpus_per_actor"),
                "device": summary.get("device"),
                "loadavg_1m_after": (_loadavg() or [None])[0],
                "foreign_cpu_fraction": foreign,
            }
            run.update(ray_data_digest(ray_tmp, seen_sessions, run_dir / "job.log"))
            job_runs.append(run)
            logger.info(
                "job %d docs: %.1fs wall (job says %ss, first write at %ss)",
                n,
                wall,
                summary.get("seconds"),
                summary.get("startup_seconds"),
            )

    ray_start = statistics.median(ray_starts) if ray_starts else 0.0
    job = side_summary(n1, n2, job_t[n1], job_t[n2], fixed_s=ray_start)
    job["ray_start_s"] = _r(ray_start)
    baseline = side_summary(n1, n2, base_t[n1], base_t[n2])
    baseline_device = baseline_runs[-1]["device"]
    job.update(
        {
            "batch_size": cfg.batch_size,
            # As the job reports them; threads_per_actor None means the job's default.
            "actors": job_runs[-1]["actors"],
            "threads_per_actor": job_runs[-1]["threads_per_actor"],
            "cpus_per_actor": job_runs[-1]["cpus_per_actor"],
            "calibration_sample": cfg.calibration_sample,
            "rows_per_actor_call": rows_per_call,
            "precision": cfg.precision,
            "commands": {k: v for k, v in commands.items() if k.startswith("job_")},
            "runs": job_runs,
        }
    )
    baseline.update(
        {
            "batch_size": args.baseline_batch_size,
            "torch_threads": baseline_runs[-1]["torch_threads"],
            "device": baseline_device,
            "call": f"SentenceTransformer(path, device={baseline_device!r}).encode(texts, "
            f"batch_size={args.baseline_batch_size})",
            "runs": baseline_runs,
        }
    )
    ratio = (
        job["steady_docs_per_s"] / baseline["steady_docs_per_s"]
        if job["steady_docs_per_s"] and baseline["steady_docs_per_s"]
        else None
    )
    # Reasons the numbers cannot be taken at face value; any of them makes the verdict null.
    doubts = []
    if ratio is None:
        doubts.append(
            "a side's large run was not slower than its small run: steady state is undefined; "
            "use more --docs or a quieter machine"
        )
    if ratio is not None and ratio > MAX_PLAUSIBLE_RATIO:
        doubts.append(
            f"the job's steady state came out {ratio:.2f}x plain encode on the same cores and model: its time "
            "does not grow linearly between the two sizes (e.g. actors idle in the small run; see each "
            "run's ray_data_passes embed_tasks and embed_task_s_min_max)"
        )
    for side in (job, baseline):
        if side["startup_s"] is not None and side["startup_s"] < 0:
            doubts.append(
                f"{'job' if side is job else 'baseline'} start-up came out negative: its small run went faster "
                "than its steady state, so one of the runs was disturbed"
            )
    if job["actors"] and n1 < job["actors"] * rows_per_call:
        doubts.append(
            f"the job hands an actor {rows_per_call} rows a call and has {job['actors']} actors; the small run "
            f"({n1} documents) cannot give each of them a full call, so the times depend on how rows split "
            f"between actors more than on throughput: use --docs {2 * job['actors'] * rows_per_call} or more"
        )
    foreign = [r["foreign_cpu_fraction"] for r in job_runs + baseline_runs if r.get("foreign_cpu_fraction") is not None]
    if foreign and max(foreign) > MAX_FOREIGN_CPU:
        doubts.append(
            f"other work used up to {max(foreign):.0%} of the CPUs during a run (see foreign_cpu_fraction): "
            "rerun on a quiet machine, or with --repeats 3"
        )
    notes = []
    if baseline_device == "cuda":
        notes.append("on CUDA the job runs the model in fp16, the plain-encode baseline in fp32")
    if n2 > available:
        notes.append("documents past the end of the input repeat it under new ids, on both sides alike")
    loadavg_after = _loadavg()
    return {
        "benchmark": "backfill_throughput",
        "command": _command_line(),
        "input": str(Path(args.input).resolve()),
        "model": source.name,
        "model_revision": source.revision,
        "model_path": source.path,
        "docs": {"small": n1, "large": n2, "distinct_in_input": available},
        "repeats": args.repeats,
        "job": job,
        "baseline": baseline,
        "ratio_steady": _r(ratio),
        "ratio_whole_run": _r(job["docs_per_s"] / baseline["docs_per_s"]),
        "target": TARGET_RATIO,
        # null when the doubts say the measurement cannot tell.
        "meets_target": None if doubts else bool(ratio >= TARGET_RATIO),
        "trustworthy": not doubts,
        "doubts": doubts,
        "machine": {
            "cpu_count": cpus,
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "job_actors": job["actors"],
            "job_threads_per_actor": job["threads_per_actor"],
            "torch_threads_baseline": baseline["torch_threads"],
            "loadavg_before": loadavg_before,
            "foreign_cpu_fraction_before": foreign_before,
            "loadavg_after": loadavg_after,
            "versions": {
                d: _version(d)
                for d in ("torch", "sentence-transformers", "transformers", "ray", "pymilvus", "milvus-lite")
            },
        },
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.docs is not None and args.docs < 2:
        raise SystemExit(f"--docs: expected at least 2, got {args.docs}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats: expected at least 1, got {args.repeats}")
    keep = args.work_dir is not None
    # Short on purpose: Ray's session sockets live under it and Unix socket paths are short.
    work = Path(args.work_dir).resolve() if keep else Path(tempfile.mkdtemp(prefix="rbench-"))
    work.mkdir(parents=True, exist_ok=True)
    if len(str(work)) > 60:
        logger.warning("work dir %s is long: Ray's socket paths under it may exceed the Unix limit", work)
    try:
        result = measure(args, work)
    except RuntimeError as exc:  # a side failed or timed out: still one JSON line, saying so
        logger.error("%s", exc)
        print(json.dumps({"benchmark": "backfill_throughput", "command": _command_line(), "error": str(exc)}))
        return 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["work_dir"] = str(work) if keep else None
    text = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.info(
        "steady: job %s docs/s, plain encode %s docs/s, ratio %s (target %s); start-up: job %ss, encode %ss",
        result["job"]["steady_docs_per_s"],
        result["baseline"]["steady_docs_per_s"],
        result["ratio_steady"],
        TARGET_RATIO,
        result["job"]["startup_s"],
        result["baseline"]["startup_s"],
    )
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
