"""Shared fixtures: a real S3 endpoint on loopback (moto's threaded server), a real local Ray instance, and the
real dermoscopy data in ../shared/data (tests needing it skip with the reason when it is absent).

Order matters: the S3 variables are set before Ray starts, because Ray's worker processes inherit the
environment of the driver at ``ray.init``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DERMRAY_TEST_DATA", REPO.parent / "shared" / "data"))

# Ray Train's controller polls its workers every 2 s by default, and a run's start and end each wait for a poll or
# two: about 3.5 s of every Train run here, which lasts seconds. Set before any Ray instance starts (the session's
# and those of the commands the tests launch inherit it); the runs themselves are unchanged.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def data_path(*parts: str) -> Path:
    """A path under the real data folder, or a skip that says what is missing and how to provide it."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path} (set DERMRAY_TEST_DATA to the shared data folder)")
    return path


_MOTO_PROCESS = """
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
server._port = server.get_host_and_port()[1]  # a restart binds the same port again, not a new free one
print(server._port, flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "stop":
        server.stop()
    elif command == "start":
        server.start()
    else:
        break
    print("ok", flush=True)
"""


class MotoProcess:
    """moto's threaded S3 server in a process of its own. In the test process it would share the GIL with the
    Ray driver, whose busy threads slow every S3 response a hundredfold. ``stop``/``start`` take the endpoint
    down and bring it back on the same port with the same buckets (the state lives in that process)."""

    def __init__(self, log_path: str) -> None:
        with open(log_path, "w") as log:  # moto logs every request: keep them out of the test output
            self.process = subprocess.Popen([sys.executable, "-c", _MOTO_PROCESS], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        self.port = int(self.process.stdout.readline())

    def get_host_and_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def _command(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"

    def stop(self) -> None:
        self._command("stop")

    def start(self) -> None:
        self._command("start")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server, in its own process); tests may stop and restart it."""
    server = MotoProcess(str(tmp_path_factory.mktemp("moto") / "requests.log"))
    yield server
    server.close()


def interrupt_s3(server, seconds: float) -> threading.Thread:
    """Take the S3 endpoint down now and bring it back (same port, same buckets) after ``seconds``."""
    server.stop()

    def restart() -> None:
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """A real S3 HTTP endpoint on 127.0.0.1, reached through the standard AWS_* environment variables."""
    host, port = s3_server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "AKIDERMRAYTESTKEY0001",
            "AWS_SECRET_ACCESS_KEY": "dermray-test-secret-do-not-print",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
    )
    yield endpoint


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(s3_client) -> str:
    """A fresh, empty bucket per test."""
    name = f"dermray-test-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory):
    """One real local Ray instance for the session: 2 CPUs, a capped object store. Its processes inherit a marker
    of this session, so that teardown can remove any that outlive ``ray.shutdown()``: once in a full run
    (2026-12-08), a TrainController logged "Shutdown complete" and then hung in its exit for half an hour, re-parented
    to init. With pytest-xdist each worker has its own instance and marker."""
    import ray

    from dermray.ray_runtime import start_local_ray
    from tests.cluster_helpers import kill_matching, processes

    session = uuid.uuid4().hex
    marker = f"DERMRAY_TEST_RAY_SESSION={session}"
    if not ray.is_initialized():
        os.environ["DERMRAY_TEST_RAY_SESSION"] = session  # inherited by every Ray process
        start_local_ray(num_cpus=2, object_store_memory=600 * 1024 * 1024)
    yield ray
    ray.shutdown()

    def still_running() -> bool:
        return any(marker in text for pid, (_, text) in processes().items() if pid != os.getpid())

    deadline = time.monotonic() + 30  # shutdown returns before its processes have exited: give them the time
    while time.monotonic() < deadline and still_running():
        time.sleep(0.5)
    left = kill_matching([marker], timeout=10)
    if left:
        warnings.warn(f"{left} process(es) started in this test session (its Ray instance's, or commands' it ran) "
                      "were still running 30 s after ray.shutdown(); killed", stacklevel=1)


@pytest.fixture
def attached_env(ray_local) -> dict:
    """The environment for a `dermray` command that joins the session's Ray instance through RAY_ADDRESS, as
    under `ray job submit`, instead of starting one of its own (5-10 s on 2 CPUs). The commands that start their
    own instance are tested where that matters: killed jobs, the leak test, the sweeps."""
    return dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)


def upload_folder(s3_client, bucket: str, prefix: str, folder: Path, limit: int | None = None) -> list[str]:
    """Upload the files of a local folder to s3://bucket/prefix/ (sorted, at most ``limit``)."""
    keys = []
    for path in sorted(p for p in folder.iterdir() if p.is_file())[:limit]:
        key = f"{prefix}/{path.name}"
        s3_client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


@pytest.fixture(scope="session")
def isic2018_on_s3(s3_client):
    """The 300 real ISIC 2018 JPEGs (600x450) and their labels under s3://<bucket>/isic2018/."""
    folder = data_path("isic2018-sample")
    name = "dermray-isic2018"
    s3_client.create_bucket(Bucket=name)
    upload_folder(s3_client, name, "isic2018/images", folder / "images")
    s3_client.upload_file(str(folder / "labels.csv"), name, "isic2018/labels.csv")
    return f"s3://{name}/isic2018"


@pytest.fixture(scope="session")
def isic2018_manifest_s3(ray_local, isic2018_on_s3):
    """The real ISIC sample staged from S3 into an S3 manifest (once per session)."""
    from dermray.data.sources import SourceOptions
    from dermray.data.stage import stage

    summary = stage(
        "csv",
        SourceOptions(out=f"{isic2018_on_s3}/staged-shared", images=f"{isic2018_on_s3}/images",
                      labels=f"{isic2018_on_s3}/labels.csv", image_col="file", label_col="dx"),
    )
    return summary["manifest"]


@pytest.fixture(scope="session")
def isic2018_manifest_local(ray_local, tmp_path_factory):
    """The real ISIC sample staged straight from ../shared/data into a local manifest (once per session)."""
    from dermray.data.sources import SourceOptions
    from dermray.data.stage import stage

    folder = data_path("isic2018-sample")
    out = tmp_path_factory.mktemp("isic2018-local")
    return stage("csv", SourceOptions(out=str(out), images=str(folder / "images"), labels=str(folder / "labels.csv"),
                                      image_col="file", label_col="dx"))["manifest"]


@pytest.fixture(scope="session")
def isic_checkpoint(isic2018_manifest_local, tmp_path_factory):
    """A small model trained (in the test session) on the real ISIC sample: the checkpoint URI."""
    from dermray.config import load_config
    from dermray.train.trainer import train

    summary = train(load_config(None, [
        f"data.manifest={isic2018_manifest_local}", f"run.storage={tmp_path_factory.mktemp('isic-runs')}",
        "run.name=shared", "model.backbone=resnet18", "model.image_size=64", "train.epochs=2",
        # lr 1e-3: at 3e-3 a randomly initialised ResNet-18 on 209 images ends with BatchNorm statistics that make
        # every prediction the same saturated class, which would make the inference tests vacuous.
        "train.batch_size=16", "train.lr=0.001",
    ]))
    return summary["checkpoint"]
