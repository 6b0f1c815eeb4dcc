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
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 120  # a loaded 2-core machine has needed 17 s; a cold one with fresh imports more


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

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
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
