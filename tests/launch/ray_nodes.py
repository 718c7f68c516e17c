"""A Ray cluster of its own for one test: a head and optional worker nodes started with
``ray start --block`` on free ports under a private temp dir, stopped by process id.

``ray stop`` would stop every Ray process on the machine, other tests' and other users'
included; this cluster stops only the processes it started and everything below them
(raylets, agents, workers, job drivers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.launch.processes import alive, descendants

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# Plasma's floor; the tests move only small messages through the object store.
OBJECT_STORE_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ports(*names: str) -> list[str]:
    return [f"--{name}={free_port()}" for name in names]


class LocalRayCluster:
    """``with LocalRayCluster(temp_dir, ...) as cluster:``, ``cluster.address`` (GCS),
    ``cluster.dashboard_url`` (Jobs API, with ``dashboard=True``)."""

    def __init__(
        self, temp_dir: Path, *, num_cpus: int = 2, dashboard: bool = False,
        resources: str | None = None,
    ) -> None:  # fmt: skip
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        # The environment of the nodes and of every client of this cluster: no token
        # authentication (it would read and write ~/.ray), no usage reports.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        head = [
            "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            f"--include-dashboard={str(dashboard).lower()}",
            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            *_ports("ray-client-server-port"),
        ]  # fmt: skip
        try:
            self._start(head, num_cpus=num_cpus, resources=resources, name="head")
        except BaseException:
            self.stop()
            raise

    def add_node(self, *, num_cpus: int, resources: str | None = None) -> None:
        """A second raylet on this machine, joined to the head: a distinct Ray node."""
        self._start(
            [f"--address={self.address}"], num_cpus=num_cpus, resources=resources,
            name=f"node{len(self.nodes)}",
        )  # fmt: skip

    def _start(self, extra: list[str], *, num_cpus: int, resources: str | None, name: str):
        command = [
            *RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus}",
            "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
            *_ports(
                "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
            ),
            *extra, *([f"--resources={resources}"] if resources else []),
        ]  # fmt: skip
        log = open(self.temp_dir / f"{name}.log", "wb")
        self.nodes.append(
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        )
        log.close()
        self._wait_for_nodes(len(self.nodes))

    def _wait_for_nodes(self, count: int) -> None:
        """Until the GCS lists ``count`` live nodes (a ``ray`` client in a child process,
        so the test process never connects to this cluster by accident)."""
        probe = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(node.poll() is not None for node in self.nodes):
                raise RuntimeError(f"a ray node exited at start: see {self.temp_dir}/*.log")
            done = subprocess.run(
                [sys.executable, "-c", probe, self.address], capture_output=True, text=True,
                env=self.env,
            )  # fmt: skip
            if done.returncode == 0 and int(done.stdout.split()[-1]) >= count:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{count} ray nodes did not start in {START_TIMEOUT_S:.0f} s")

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index``'s raylet (the node dies; its workers follow)."""
        node = self.nodes[index]
        for pid in descendants(node.pid):
            if _command(pid).startswith(("/", "raylet")) and "raylet" in _command(pid):
                os.kill(pid, signal.SIGKILL)
                return
        raise RuntimeError(f"node {index} has no raylet")

    def stop(self) -> None:
        """SIGTERM every process this cluster started and all below them, then SIGKILL
        what is left after a grace period."""
        pids = set()
        for node in self.nodes:
            pids |= {node.pid} | descendants(node.pid)
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.2)
        for node in self.nodes:
            node.wait(timeout=5)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
