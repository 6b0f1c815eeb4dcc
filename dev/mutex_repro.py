"""Try to reproduce the native abort seen in Ray Data tasks (docs/internals.md, "Mutex corrupt").

The abort was seen in a worker that had run staging's probe tasks (eight threads reading images through pyarrow's
filesystems) and then a ``get_table_block_metadata_schema`` task (``ray.data.from_arrow``). This loop does exactly
that, in fresh local Ray sessions, and counts the workers that died with the message in Ray's logs.

    python dev/mutex_repro.py --images ../shared/data/ham10000-300/images --sessions 10 --rounds 5
    python dev/mutex_repro.py --images s3://bucket/images ...   # through pyarrow's S3 filesystem (AWS_* set)

Prints one line per session and a JSON summary (sessions, rounds, aborts found in the logs, package versions).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

MESSAGE = "Mutex corrupt"


def _one_session(images: list[str], rounds: int, temp_dir: str) -> tuple[int, int]:
    """(worker logs with the abort, workers that ran a probe task and later a metadata task) for one session."""
    import pyarrow as pa
    import ray

    from dermray.data.stage import probe_images

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, _temp_dir=temp_dir)
    try:
        for _ in range(rounds):
            probe_images(images)
            # from_arrow runs get_table_block_metadata_schema once per table, in the same worker pool.
            tables = [pa.table({"image_uri": images[i::16]}) for i in range(16)]
            ray.data.from_arrow(tables).count()
    finally:
        ray.shutdown()
    # session_latest is a link to the session's folder: each file once, by its real path.
    logs = {os.path.realpath(p) for p in glob.glob(os.path.join(temp_dir, "session_*", "logs", "*"))}
    worker_logs = [log for log in logs if os.path.isfile(log) and os.path.basename(log).startswith("worker-")]
    if not worker_logs:
        raise SystemExit(f"no worker logs under {temp_dir}: the scan would prove nothing")
    texts = [Path(log).read_text(errors="replace") for log in worker_logs]
    return sum(MESSAGE in text for text in texts), sum(_probe_then_metadata(text) for text in texts)


def _probe_then_metadata(log: str) -> bool:
    # Ray writes ":task_name:<name>" into a worker's log each time the worker starts a task of another name.
    probe = log.find("_probe_batch")
    return probe >= 0 and log.rfind("get_table_block_metadata_schema") > probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="a folder or s3:// prefix of JPEGs (the probe reads them)")
    parser.add_argument("--count", type=int, default=512, help="images probed per round (default 512)")
    parser.add_argument("--sessions", type=int, default=10, help="fresh local Ray sessions (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="probe-then-from_arrow rounds per session (default 5)")
    args = parser.parse_args()
    from dermray import storage

    images = sorted(u for u in storage.list_files(args.images) if u.lower().endswith(".jpg"))[: args.count]
    if not images:
        print(f"no .jpg files in {args.images}", file=sys.stderr)
        return 2
    aborted_logs = workers_at_risk = 0
    started = time.monotonic()
    for session in range(args.sessions):
        with tempfile.TemporaryDirectory(prefix="ray-mutex-", dir="/tmp") as temp_dir:
            found, both = _one_session(images, args.rounds, temp_dir)
        aborted_logs += found
        workers_at_risk += both
        print(f"session {session + 1}/{args.sessions}: {found} log file(s) with '{MESSAGE}'; "
              f"{both} worker(s) ran a probe task and then a metadata task", flush=True)
    print(json.dumps({"sessions": args.sessions, "rounds_per_session": args.rounds, "images_per_round": len(images),
                      "log_files_with_abort": aborted_logs,
                      "workers_probe_then_metadata": workers_at_risk, "seconds": round(time.monotonic() - started, 1),
                      "versions": {p: version(p) for p in ("ray", "pyarrow", "grpcio", "protobuf", "numpy")},
                      "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
