"""The console filter that turns a dying Ray worker's native dump into one line (dermray.ray_console).

tests/test_ray_diagnostics.py checks it end to end, on a real worker's abort forwarded by a real Ray driver; these
check the cases one abort cannot show: a dump split across batches, another worker's lines between, a second
dying worker, and everything else passing through untouched."""

from dermray.ray_console import CrashDumpFilter


def _batch(pid, lines, is_err=True, ip="10.0.0.1"):
    return {"ip": ip, "pid": pid, "job": "01000000", "is_err": is_err, "lines": lines, "task_name": "read"}


def _filtered(batches):
    printed = []
    console = CrashDumpFilter(printed.append)
    for batch in batches:
        console(batch)
    return [(b["pid"], line) for b in printed for line in b["lines"]]


def test_a_dump_split_across_batches_is_one_line_and_other_workers_pass_through():
    printed = _filtered([
        _batch(7, ["reading 12 files", "[mutex.cc:1418] Lock: Mutex corrupt: both reader and writer lock held: 0x1",
                   "*** SIGABRT received at time=1 on cpu 0 ***"]),
        _batch(8, ["Traceback (most recent call last):", "ValueError: a Python error is not a native dump"]),
        _batch(7, ["PC: @     0x7f8f08e9feec  (unknown)  (unknown)", "Fatal Python error: Aborted", "",
                   "Extension modules: numpy, pyarrow.lib (total: 2)"]),
        _batch(7, ["epoch 1 done"], is_err=False),  # stdout is not the dump
    ])
    assert printed[0] == (7, "reading 12 files")
    assert printed[1][0] == 7 and printed[1][1].startswith(
        "[dermray] this Ray worker died natively (Lock: Mutex corrupt: both reader and writer lock held: 0x1)")
    assert printed[2:] == [(8, "Traceback (most recent call last):"),
                           (8, "ValueError: a Python error is not a native dump"), (7, "epoch 1 done")]


def test_each_dying_worker_gets_its_line_and_a_faulthandler_only_dump_counts():
    printed = _filtered([
        _batch(7, ["[2026-12-07 12:19:44,767 E 7 7] logging.cc:474: *** SIGSEGV received at time=2 on cpu 1 ***",
                   "[2026-12-07 12:19:44,768 E 7 7] logging.cc:474: PC: @ 0x1 (unknown) (unknown)",
                   "[2026-12-07 12:19:44,768 E 7 7] logging.cc:474:     @     0x2  150947600  (unknown)"]),
        _batch(7, ["line of worker 7 on another node"], ip="10.0.0.2"),
        _batch(9, ["Fatal Python error: Segmentation fault", "", "Current thread 0x1 (most recent call first):"]),
    ])
    assert [pid for pid, _ in printed] == [7, 7, 9]
    assert "(*** SIGSEGV received at time=2 on cpu 1 ***)" in printed[0][1]
    assert printed[1][1] == "line of worker 7 on another node"
    assert "(Fatal Python error: Segmentation fault)" in printed[2][1]


def test_a_dump_ends_at_its_first_line_that_is_not_part_of_one():
    # A long job can see the dead worker's process id again, as a new worker whose lines must show.
    printed = _filtered([
        _batch(7, ["*** SIGABRT received at time=1 on cpu 0 ***", "    @     0x7f8f08e51050  150947600  (unknown)",
                   "Fatal Python error: Aborted", "", "Stack (most recent call first):",
                   '  File "/ray/_private/worker.py", line 1069 in main_loop', "Extension modules: numpy (total: 1)"]),
        _batch(7, ["a new worker's warning"]),
    ])
    assert len(printed) == 2 and printed[1] == (7, "a new worker's warning")


def test_raylet_lines_and_ordinary_errors_are_untouched():
    raylet = {"ip": "10.0.0.1", "pid": "raylet", "is_err": True, "lines": ["*** SIGABRT received by the raylet"]}
    assert _filtered([raylet, _batch(3, ["WARNING: 2 images skipped"])]) == [
        ("raylet", "*** SIGABRT received by the raylet"), (3, "WARNING: 2 images skipped")]
