"""A Ray worker that aborts natively during a command is reported in one line and its evidence kept.

The abort is real: a Ray worker process calls abort() while a `dermray stage` runs in the same Ray instance, and
Ray's own signal handler writes the native frames into the worker's log. Only the abseil message that preceded
the project's real aborts (docs/internals.md) is written by the test, just before it, since no test can make
abseil's Mutex corrupt on purpose."""

import json
import os
import subprocess
import sys

from dermray.ray_diagnostics import find_native_aborts
from tests.cluster_helpers import kill_matching

ABORT_DURING_A_COMMAND = r"""
import json, os, sys, time
import ray
from dermray.cli import main
from dermray.ray_runtime import ensure_ray

out = sys.argv[1]
ensure_ray()

@ray.remote(num_cpus=0, max_retries=0)
def get_table_block_metadata_schema(folder):
    while not os.path.isdir(folder):  # abort once the command is under way
        time.sleep(0.02)
    sys.stderr.write("[mutex.cc:1418] Lock: Mutex corrupt: both reader and writer lock held: 0x7f00\n")
    sys.stderr.flush()
    os.abort()

doomed = get_table_block_metadata_schema.remote(out)
first = main(["stage", "synthetic", "--out", out, "--images-per-class", "6", "--image-size", "32"])
ray.wait([doomed], timeout=30)
second = main(["stage", "synthetic", "--out", out + "-again", "--images-per-class", "6", "--image-size", "32"])
sys.exit(first or second)
"""


def _abort_during_a_command(tmp_path, diagnostics: str, debug: bool = False) -> subprocess.CompletedProcess:
    temp_dir = f"/tmp/drd-{os.getpid()}"
    env = dict(os.environ, RAY_TMPDIR=temp_dir, DERMRAY_DIAGNOSTICS_DIR=diagnostics)
    env.pop("RAY_ADDRESS", None)
    env.pop("DERMRAY_DEBUG", None)
    if debug:
        env["DERMRAY_DEBUG"] = "1"
    try:
        return subprocess.run([sys.executable, "-c", ABORT_DURING_A_COMMAND, str(tmp_path / "staged")], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        kill_matching([temp_dir])


def _reported_once(result: subprocess.CompletedProcess, debug: bool = False) -> dict:
    """The first command's report, after checking the contract around it; the second command reports nothing."""
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["images"] == 6 * 4 and first["skipped"] == 0  # the command's own result stands
    report = first["native_worker_aborts"]
    assert report["count"] == 1
    assert report["first"] == "Lock: Mutex corrupt: both reader and writer lock held: 0x7f00"
    # The next command in the same Ray instance does not report the earlier command's abort again.
    assert "native_worker_aborts" not in second
    warnings = [line for line in result.stderr.splitlines() if "aborted natively" in line]
    assert len(warnings) == 1 and warnings[0].startswith("dermray stage: warning: 1 Ray worker aborted natively")
    assert report["kept_in"] in warnings[0]
    # The dying worker's native dump is one line on the console (its frames stay in the worker's log), or the
    # whole dump with DERMRAY_DEBUG=1.
    died = [line for line in result.stderr.splitlines() if "[dermray] this Ray worker died natively" in line]
    if debug:
        assert died == [] and all(dump_line in result.stderr for dump_line in NATIVE_DUMP)
    else:
        assert len(died) == 1 and "(Lock: Mutex corrupt: both reader and writer lock held: 0x7f00)" in died[0]
        assert [dump_line for dump_line in NATIVE_DUMP if dump_line in result.stderr] == []
    return report


# What the dump of a dying Ray worker prints: abseil's signal handler, then Python's faulthandler.
NATIVE_DUMP = ("*** SIGABRT received", "PC: @", "Fatal Python error: Aborted", "Stack (most recent call first)",
               "Extension modules:")


def _check_kept(log_name: str, log_text: str, versions: dict, report: dict) -> None:
    # What an upstream report needs: the message, Ray's native frames, and the Python stack that called in.
    assert "Mutex corrupt" in log_text and "*** SIGABRT received" in log_text
    assert "in get_table_block_metadata_schema" in log_text
    assert versions["aborts"] == [{"log": log_name, "message": report["first"],
                                   "task": "get_table_block_metadata_schema"}]
    assert versions["packages"]["ray"] and versions["packages"]["pyarrow"]
    assert versions["cpu"]["cores"] >= 1


def test_a_native_abort_during_a_command_is_reported_once_and_kept(tmp_path):
    report = _reported_once(_abort_during_a_command(tmp_path, str(tmp_path / "diagnostics")))
    kept = tmp_path / "diagnostics" / os.path.basename(report["kept_in"])
    assert str(kept) == report["kept_in"]
    logs = sorted(kept.glob("worker-*.err"))
    assert len(logs) == 1
    _check_kept(logs[0].name, logs[0].read_text(), json.loads((kept / "versions.json").read_text()), report)


def test_the_evidence_can_be_kept_on_s3_and_dermray_debug_prints_the_dump(tmp_path, s3_client, bucket):
    # A nightly run on a cluster has no local disk anyone looks at: the same folder, under an s3:// prefix. The same
    # run (one abort serves both: each costs a Ray instance) has DERMRAY_DEBUG=1, which prints the whole dump.
    report = _reported_once(_abort_during_a_command(tmp_path, f"s3://{bucket}/diagnostics", debug=True), debug=True)
    prefix = report["kept_in"].removeprefix(f"s3://{bucket}/")
    assert report["kept_in"].startswith(f"s3://{bucket}/diagnostics/session_")
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    logs = [k for k in keys if os.path.basename(k).startswith("worker-")]
    assert len(logs) == 1 and keys == sorted([logs[0], f"{prefix}/versions.json"])

    def read(key: str) -> str:
        return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()

    _check_kept(os.path.basename(logs[0]), read(logs[0]), json.loads(read(f"{prefix}/versions.json")), report)
    assert not (tmp_path / "dermray-diagnostics").exists()  # nothing written locally instead


def _worker_log(folder, name, job, body):
    path = folder / f"worker-{name}-ffffffff-1.err"
    path.write_text(f":job_id:{job}\n:task_name:read\n{body}")
    return path


def test_only_this_jobs_aborts_count_and_ordinary_errors_are_not_aborts(tmp_path):
    _worker_log(tmp_path, "a", "01000000", "*** SIGSEGV received at time=1 on cpu 0 ***\nPC: @ 0x1\n")
    _worker_log(tmp_path, "b", "02000000", "*** SIGABRT received at time=1 on cpu 0 ***\n")  # another job's
    _worker_log(tmp_path, "c", "01000000", "Traceback (most recent call last):\nValueError: abort the read\n")
    _worker_log(tmp_path, "d", "01000000", "[2026-12-07 12:19:44,767 E 1 1] logging.cc:474: *** SIGBUS received"
                                           " at time=2 on cpu 1 ***\n")
    found = find_native_aborts(tmp_path, "01000000")
    assert [(a.log.name.split("-")[1], a.message, a.task) for a in found] == [
        ("a", "*** SIGSEGV received at time=1 on cpu 0 ***", "read"),
        ("d", "*** SIGBUS received at time=2 on cpu 1 ***", "read"),
    ]
    # Written before the command started: not this command's.
    assert find_native_aborts(tmp_path, "01000000", since=found[0].log.stat().st_mtime + 60) == []
