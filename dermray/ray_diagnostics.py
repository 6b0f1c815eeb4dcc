"""Native aborts in Ray's worker processes, found after a command and kept for an upstream report.

A worker that dies of a native abort (SIGABRT, SIGSEGV: a C++ library's bug, such as the ``Mutex corrupt``
abort in docs/internals.md) is replaced by Ray and its task retried, so the command usually ends as it would
have; what is lost is the evidence: the abort's lines scroll past on stderr and Ray's session folder is
temporary. After each command that ran Ray, the worker logs this command's job wrote are scanned; each one that
holds an abort is kept (locally or on S3), beside the package versions and the CPU, and one line says where.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dermray import storage

# What a native abort leaves in a Ray worker's .err: abseil's failure signal handler (installed in every Ray
# worker) prints "*** SIGABRT received at time=...", and abseil's Mutex names its corruption before aborting.
ABORT_PATTERN = re.compile(r"\*\*\* SIG(ABRT|SEGV|BUS|ILL|FPE) received|Mutex corrupt")
_JOB_LINE = re.compile(r"^:job_id:([0-9a-f]+)$", re.MULTILINE)
_TASK_LINE = re.compile(r"^:(?:task|actor)_name:(.+)$", re.MULTILINE)
PACKAGES = ("ray", "pyarrow", "torch", "torchvision", "numpy", "grpcio", "protobuf", "pillow", "pandas")
KEPT_BYTES = 1 << 20  # the end of a worker log, where its abort is; a worker's log has no other size limit
ENV_VAR = "DERMRAY_DIAGNOSTICS_DIR"


@dataclass(frozen=True)
class NativeAbort:
    log: Path
    message: str  # the abort's first line, e.g. "Lock: Mutex corrupt: both reader and writer lock held"
    task: str     # the task or actor the worker ran last before it ("" when its log does not say)


def find_native_aborts(logs_dir: Path, job_id: str, since: float = 0.0) -> list[NativeAbort]:
    """The aborts in the worker logs of ``logs_dir`` that served job ``job_id`` and were written at or after
    ``since`` (a time.time()). Ray names a pooled worker's log before it knows its job, so the job is read from
    the ``:job_id:`` lines Ray writes into the log."""
    aborts = []
    for log in sorted(logs_dir.glob("worker-*.err")):
        try:
            if log.stat().st_mtime < since:
                continue
            text = log.read_text(errors="replace")
        except OSError:  # a worker's log can go with its session while this runs
            continue
        match = ABORT_PATTERN.search(text)
        if match is None or job_id not in _JOB_LINE.findall(text[:match.start()]):
            continue
        line = text[text.rfind("\n", 0, match.start()) + 1:].split("\n", 1)[0].strip()
        tasks = _TASK_LINE.findall(text[:match.start()])
        aborts.append(NativeAbort(log=log, message=without_log_prefix(line), task=tasks[-1].strip() if tasks else ""))
    return aborts


def without_log_prefix(line: str) -> str:
    """``[mutex.cc:1234] Lock: Mutex corrupt...`` or ``[2026-... E 1 1] logging.cc:474: *** SIGABRT...``: the
    message alone."""
    return re.sub(r"^\[[^\]]*\]\s*(\S+\.cc:\d+:\s*)?", "", line)


def keep_native_aborts(aborts: list[NativeAbort], destination: str) -> str:
    """Copy each abort's log (its last ``KEPT_BYTES``, credentials redacted) into ``destination`` (a folder or
    ``s3://`` prefix) and write ``versions.json`` beside them: what an upstream report needs and Ray's temporary
    session folder loses."""
    from dermray.ops.tracking import redact

    destination = storage.normalize(destination)
    for abort in aborts:
        text = abort.log.read_bytes()[-KEPT_BYTES:].decode(errors="replace")
        storage.write_text(storage.join(destination, abort.log.name), redact(text))
    summary = {
        "aborts": [{"log": a.log.name, "message": a.message, "task": a.task} for a in aborts],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu(),
        "packages": {name: _version(name) for name in PACKAGES},
    }
    storage.write_text(storage.join(destination, "versions.json"), json.dumps(summary, indent=2) + "\n")
    return destination


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> dict[str, object]:
    """The CPU's model and the instruction sets a native library may pick its code path by."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or None, "cores": os.cpu_count()}
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
    return {"model": model.group(1).strip() if model else None, "cores": os.cpu_count(),
            "flags": [flag for flag in wanted if flag in flags]}


def report_native_aborts(command: str, since: float) -> dict[str, object] | None:
    """After a command: keep and announce the native aborts of this process's Ray job since ``since``. Returns
    the summary's entry (None when there were none, or when Ray did not run here)."""
    from dermray.ray_runtime import local_logs_dir

    located = local_logs_dir()
    if located is None:
        return None
    logs_dir, job_id = located
    aborts = find_native_aborts(logs_dir, job_id, since)
    if not aborts:
        return None
    base = os.environ.get(ENV_VAR) or "dermray-diagnostics"
    kept = keep_native_aborts(aborts, storage.join(base, f"{logs_dir.parent.name}-{command}"))
    workers = "1 Ray worker" if len(aborts) == 1 else f"{len(aborts)} Ray workers"
    print(f"dermray {command}: warning: {workers} aborted natively ({aborts[0].message}); Ray replaces dead "
          f"workers and retries their tasks; the logs and package versions, for a bug report, are kept in {kept} "
          f"(see docs/internals.md)", file=sys.stderr)
    return {"count": len(aborts), "first": aborts[0].message, "kept_in": str(kept)}
