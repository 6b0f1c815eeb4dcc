"""Connecting to Ray: the cluster a job was submitted to, or a local instance when run by hand."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

# The session folder of the Ray instance this process started or joined (its logs are under it): ray.init's
# context says it, and nothing public says it later.
_session_dir: str | None = None


def ensure_ray() -> None:
    """Connect once per process. Under `ray job submit` RAY_ADDRESS names the cluster; otherwise a local
    instance starts, sized to this machine, with the dashboard on (Ray Train V2 queries it)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Ray's INFO lines about connecting would precede a bad-input error's one line, as they would not locally.
        _remember_session(ray.init(log_to_driver=True, logging_level="WARNING"))
        return
    store = os.environ.get("DERMRAY_OBJECT_STORE_BYTES")
    start_local_ray(object_store_memory=int(store) if store else None)


def start_local_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Start a local Ray instance whose processes know its own dashboard address.

    Ray Train's placement-group cleaner (the actor that frees a run's worker CPUs once its controller is gone,
    e.g. a Tune trial stopped by ASHA) finds the dashboard by scanning the machine for Ray instances, and dies
    when it sees two (any other Ray on the same machine). The stopped trial's workers then keep their CPUs and
    the next trial waits forever for Ray Data. With ``RAY_API_SERVER_ADDRESS`` set before the instance starts,
    every Ray process of this instance inherits the right address and nothing is guessed.
    """
    import ray

    port = _free_port()
    # Only for the start: Ray's processes (raylet, then every worker it forks) inherit it; this process's own
    # children must not, since they may start Ray instances of their own.
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port,
                           object_store_memory=object_store_memory, logging_level="WARNING", log_to_driver=True)
    finally:
        if previous is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous
    _remember_session(context)
    if not (context.dashboard_url or "").endswith(f":{port}"):
        # The port was taken between the probe and the start: the cleaner falls back to Ray's own search.
        logging.getLogger(__name__).warning(
            "Ray's dashboard started at %s, not on port %d: with another Ray instance on this machine, Ray Train "
            "may not free a stopped run's CPUs", context.dashboard_url, port)


def _remember_session(context) -> None:
    global _session_dir
    _session_dir = (getattr(context, "address_info", None) or {}).get("session_dir")
    if not debug_enabled():
        from dermray.ray_console import quiet_native_crash_dumps

        quiet_native_crash_dumps()  # a dying worker's native stack: one line on the console, not forty


def local_logs_dir() -> tuple[Path, str] | None:
    """The logs folder of this process's Ray session, where it is on this machine (a local instance, or the
    head node a job was submitted to), and this process's job id; None when Ray did not run here."""
    import ray

    if _session_dir is None or not ray.is_initialized():
        return None
    logs = Path(_session_dir) / "logs"
    return (logs, ray.get_runtime_context().get_job_id()) if logs.is_dir() else None


def _free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def debug_enabled() -> bool:
    """``DERMRAY_DEBUG=1``: tracebacks on stderr, as well as in Ray's logs."""
    return bool(os.environ.get("DERMRAY_DEBUG"))


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def keep_off_console(*prefixes: str) -> None:
    """In this Ray Train process (a worker or the controller), keep the log records that start with ``prefixes``
    off the console, which ``log_to_driver`` copies to the user's stderr; Ray Train's own log files still get
    them. Used for the tracebacks of a failed training function: the command's one-line error says what failed."""
    for handler in logging.getLogger("ray.train").handlers:
        # The console handler is a StreamHandler; Ray Train's file handlers are plain Handlers.
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(_DropMessages(prefixes))
