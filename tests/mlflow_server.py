"""A real MLflow tracking server on loopback for the tests (``mlflow server``: REST API, UI, model registry,
proxied artifacts), backed by a SQLite file and an artifact folder under a temporary directory.

A test module makes it its fixture (module-scoped: one server per module; an imported fixture would trip
ruff's F811 at every test that takes it)::

    from tests.mlflow_server import serving

    @pytest.fixture(scope="module")
    def mlflow_server(tmp_path_factory):
        with serving(tmp_path_factory.mktemp("mlflow")) as server:
            yield server

    def test_something(mlflow_server):
        uri = mlflow_server.uri

``stop()``/``start()`` take the server down (connections refused) and bring it back on the same port with the
same runs (the state is in the SQLite file); ``pause()``/``resume()`` freeze it instead (connections are accepted
and never answered: the hung-server case that only timeouts end). Startup costs seconds on a small machine
(two Python processes import MLflow), hence one server per test module.

The server runs from a venv of its own with the full ``mlflow`` at the version of the client installed here:
dermray and its tests need only the client (``mlflow-skinny``, the ``mlflow`` and ``dev`` extras), and the full
package pins pyarrow below the version a default install of dermray resolves, so installing it next to dermray
would test dermray on another pyarrow. The venv is kept under ~/.cache/dermray-test-mlflow/<version> so reruns on
one machine take no time; it is built (about 50 s) when that is absent or broken, or always with
DERMRAY_TEST_MLFLOW_FRESH=1. Concurrent test sessions build it once: a lock file next to it, and a build goes to a
directory of its own that is renamed into place when complete. Where it cannot be built (no pip index reachable,
no ``venv`` module), the tests that take the server skip, saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 120  # a loaded 2-core machine has needed 17 s; a cold one with fresh imports more
SERVER_VENVS = Path.home() / ".cache" / "dermray-test-mlflow"
BUILD_TIMEOUT_S = 900
UNREACHABLE = ("No matching distribution", "Could not find a version", "Failed to establish a new connection",
               "Network is unreachable", "Temporary failure in name resolution")


def client_version() -> str:
    """The installed MLflow client's version (mlflow-skinny's; a full mlflow brings its own skinny at its version)."""
    try:
        return importlib.metadata.version("mlflow-skinny")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the MLflow client is not installed: pip install -e '.[dev]'")


def _works(venv: Path, version: str) -> bool:
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m, sys; import mlflow.server; "
                            f"sys.exit(m.version('mlflow') != {version!r})"],
                           capture_output=True, timeout=120) if python.exists() else None
    return probe is not None and probe.returncode == 0


def _build_server_venv(target: Path, requirement: str) -> str | None:
    """A venv at ``target`` with ``requirement`` installed; None, or one line saying why it could not be built
    (the whole output is left in ``<target>.build.log``). The caller holds the lock."""
    building = target.with_name(target.name + f".building-{os.getpid()}")
    log = target.with_name(target.name + ".build.log")
    for stale in target.parent.glob(target.name + ".building-*"):  # left by a killed build (the lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    steps = {"python -m venv": [sys.executable, "-m", "venv", str(building)],
             f"pip install {requirement}": [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet",
                                            "--disable-pip-version-check", requirement]}
    for label, step in steps.items():
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            shutil.rmtree(building, ignore_errors=True)
            return f"the MLflow server's venv: {label} took over {BUILD_TIMEOUT_S} s"
        if done.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            log.write_text(f"$ {' '.join(step)}\n{done.stdout}{done.stderr}")
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1].strip()
            what = f"pip cannot install {requirement}" if any(m in done.stderr for m in UNREACHABLE) else (
                f"cannot build the MLflow server's venv ({label} failed)")
            return f"{what}: {last} (output in {log})"
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)  # whole or absent: an interrupted build never looks like a usable venv
    log.unlink(missing_ok=True)
    return None


def server_python(scratch: Path) -> Path:
    """The Python of a venv with ``mlflow==<the client's version>`` (cached per machine and version; under
    ``scratch`` with DERMRAY_TEST_MLFLOW_FRESH=1), built when missing; skips the calling test when it cannot be.
    The server runs as ``python -m mlflow``: the venv is built elsewhere and renamed into place, which leaves the
    console scripts' shebangs pointing at the old path."""
    version = client_version()
    venv = (scratch if os.environ.get("DERMRAY_TEST_MLFLOW_FRESH") else SERVER_VENVS) / version
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; released on close, also when this process dies
        if not _works(venv, version):
            why = _build_server_venv(venv, f"mlflow=={version}")
            if why is not None:
                pytest.skip(why)
    return venv / "bin" / "python"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in a process group of its own, so that stopping it ends the uvicorn worker it spawns
    too."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self.python = server_python(self.root)

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "mlflow", "server",
            "--host", "127.0.0.1",  # loopback only; the default security middleware allows localhost Host headers
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            # Runs' artifacts go through the server (mlflow-artifacts:/ URIs) into this folder: clients need no
            # access to the artifact store, as with a real shared server.
            "--artifacts-destination", str(self.root / "artifacts"),
        ]

    def start(self) -> None:
        env = dict(
            os.environ,
            # The server's job runner (huey consumers for GenAI jobs: seven extra processes) is not needed here.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        with open(self.root / "server.log", "a") as log:  # every request is logged: keep them out of test output
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}: "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _signal(self, sig: int) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, sig)  # the group this server leads, nothing else
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Down: the port refuses connections. SIGTERM lets uvicorn close; SIGKILL whatever of the group is left
        (a TERM to the parent alone has been seen to orphan its children)."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=15)
        self.process = None

    def pause(self) -> None:
        """Hung: the kernel still accepts connections, nothing answers them."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)


@contextlib.contextmanager
def serving(root: Path) -> Iterator[MlflowServer]:
    """A running MLflow tracking server on 127.0.0.1 with its state under ``root``, stopped on exit (also when a
    test left it stopped or paused)."""
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
