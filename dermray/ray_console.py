"""What reaches the user's console from Ray's workers: a native crash dump becomes one line.

Ray copies every worker's stdout and stderr to the driver's console (``log_to_driver``). A worker that dies of a
native abort (the rare ``Mutex corrupt`` abort of docs/internals.md, a SIGSEGV in a C++ library) prints twenty to
forty lines there first: abseil's signal handler's frames, twice, then Python's faulthandler stack and its list of
extension modules. Ray replaces the worker and retries its task, so the command usually ends as it would have, and
after it ``dermray.ray_diagnostics`` keeps the worker's log for a bug report and says where in one line. On the
console the dump says nothing a user can act on, so it is replaced by one line per worker; the dump stays in
Ray's log of the worker, and ``DERMRAY_DEBUG=1`` prints it as before.

Ray has no public hook for this: its driver hands each batch of forwarded lines to the handlers of
``ray._private.ray_logging.global_worker_stdstream_dispatcher`` (Ray's client server uses the same dispatcher),
and ``ray.init`` registers the printer as ``ray_print_logs``. That printer is wrapped here. Where a future Ray
moves it, nothing is wrapped and the dump prints as it did; tests/test_ray_diagnostics.py fails then.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dermray.ray_diagnostics import ABORT_PATTERN, without_log_prefix

# What starts a worker's dying words on stderr: the abort's own message, abseil's signal handler, or Python's
# faulthandler (on in every Ray worker).
_DUMP_START = re.compile(ABORT_PATTERN.pattern + r"|^Fatal Python error: ")
# What the rest of a dump is made of, once Ray's log prefix is off (without_log_prefix). A dump ends at the first
# line that is none of these (a process id can come back as a new worker later in a long job, whose lines must show).
_DUMP_LINE = re.compile(
    r"^\s*$"  # faulthandler's blank lines
    r"|^(\*\*\* SIG|PC: @|\s*@\s)"  # abseil's frames (indented, or not once a prefix is off)
    r"|^(Fatal Python error|Python runtime state:|Stack \(most recent call first\)|Current thread 0x|Thread 0x"
    r"|Extension modules:|  File \"|  <no Python frame>|  Garbage-collecting)"
)
_PRINTER = "ray_print_logs"


class CrashDumpFilter:
    """Wraps Ray's printer of forwarded worker output; replaces each worker's native crash dump by one line."""

    def __init__(self, printer: Callable[[dict], None]) -> None:
        self.printer = printer
        self.dying: set[tuple[str, str]] = set()  # (node ip, pid) of the workers whose dump is printing

    def __call__(self, data: dict) -> None:
        if data.get("is_err") and data.get("pid") not in (None, "raylet", "autoscaler"):
            data = dict(data, lines=self._without_dumps((str(data.get("ip")), str(data.get("pid"))),
                                                        data.get("lines") or []))
            if not data["lines"]:
                return
        self.printer(data)

    def _without_dumps(self, worker: tuple[str, str], lines: list[str]) -> list[str]:
        kept = []
        for line in lines:
            if worker in self.dying:
                if _DUMP_LINE.search(without_log_prefix(line)):
                    continue
                self.dying.discard(worker)
            if _DUMP_START.search(line):
                self.dying.add(worker)
                kept.append(f"[dermray] this Ray worker died natively ({without_log_prefix(line.strip())}); its "
                            "stack is in Ray's log of the worker, kept after the command (DERMRAY_DEBUG=1 prints "
                            "it here)")
                continue
            kept.append(line)
        return kept


def quiet_native_crash_dumps() -> None:
    """Wrap the printer ``ray.init`` registered in this process (once per ``ray.init``)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            for index, (name, handler) in enumerate(dispatcher.handlers):
                if name == _PRINTER and not isinstance(handler, CrashDumpFilter):
                    dispatcher.handlers[index] = (name, CrashDumpFilter(handler))
                    return
    except (ImportError, AttributeError, TypeError, ValueError):
        pass  # a Ray whose internals moved: the dump prints as it does without dermray
