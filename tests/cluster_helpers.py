"""Real multi-process Ray clusters on loopback for tests: a head and worker nodes started with `ray start`.

`ray stop` would kill every Ray process on the machine, the test session's own local instance included (its
driver then exits), so teardown kills only the processes of this cluster: those whose command line names its
temp folder or GCS address, and all their descendants.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind((LOOPBACK, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_ports(ports: list[int]) -> list[str]:
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    return [f"{name}={port}" for name, port in zip(names, ports)]


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line and environment) for every live process, read from /proc.

    The environment counts because Ray renames its worker processes (``ray::TrainController``), and once their
    raylet is killed they are re-parented to init: only the inherited ``RAY_TMPDIR`` still says whose they are.
    """
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie is already dead; only its parent's wait() is missing
                continue
            parent = int(fields[1])
            text = b""
            for name in ("cmdline", "environ"):
                with open(f"/proc/{entry}/{name}", "rb") as source:
                    text += source.read().replace(b"\0", b" ") + b" "
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, text.decode(errors="replace"))
    return table


def kill_matching(markers: list[str], timeout: float = 30.0) -> int:
    """SIGKILL every process whose command line or environment holds one of ``markers``, and all of their
    descendants, and wait until they are gone (so none of them writes anything afterwards)."""
    table = processes()
    roots = {pid for pid, (_, text) in table.items() if any(m in text for m in markers)}
    roots.discard(os.getpid())
    victims, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - victims
        victims |= frontier
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and victims & set(processes()):
        time.sleep(0.1)
    return len(victims)


@dataclass
class LocalCluster:
    """A head node and ``workers`` worker nodes, each a separate raylet with its own object store."""

    cpus_per_node: int = 2
    workers: int = 1
    temp_dir: str = field(default_factory=lambda: f"/tmp/drc-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    address: str = ""
    dashboard: str = ""
    env: dict = field(default_factory=dict)
    env_overrides: dict = field(default_factory=dict)
    """Extra environment for the nodes (their workers and jobs inherit it)."""

    def start(self) -> LocalCluster:
        ports = free_ports(3 + 6 * (1 + self.workers))
        self.address = f"{LOOPBACK}:{ports[0]}"
        self.dashboard = f"http://{LOOPBACK}:{ports[1]}"
        # Token authentication is Ray's default: the head writes the token, the other nodes and every client
        # must run in token mode to read it.
        self.env = dict(os.environ, RAY_TMPDIR=self.temp_dir, RAY_AUTH_MODE="token", **self.env_overrides)
        common = [f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", f"--node-ip-address={LOOPBACK}",
                  "--disable-usage-stats"]
        commands = [[RAY, "start", "--head", f"--port={ports[0]}", f"--dashboard-port={ports[1]}",
                     "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={ports[2]}",
                     f"--temp-dir={self.temp_dir}", *common, *_node_ports(ports[3:9])]]
        for i in range(self.workers):
            node_ports = ports[9 + 6 * i: 15 + 6 * i]
            commands.append([RAY, "start", f"--address={self.address}", *common, *_node_ports(node_ports)])
        try:
            for command in commands:
                started = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=180)
                if started.returncode != 0:
                    raise RuntimeError(f"{' '.join(command[:3])} failed: {started.stderr[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def client_env(self, **extra: str) -> dict:
        """Environment for a driver or `ray job submit` that should use this cluster."""
        return dict(self.env, RAY_ADDRESS=self.address, **extra)

    def stop(self) -> None:
        kill_matching([self.temp_dir, self.address] if self.address else [self.temp_dir])
