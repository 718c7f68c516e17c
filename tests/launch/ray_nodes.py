"""A Ray cluster of its own for one test: a head and optional worker nodes started with
``ray start --block`` on free ports under a private temp dir, stopped by process id.

``ray stop`` would stop every Ray process on the machine, other tests' and other users'
included; this cluster stops only the processes it started and everything below them
(raylets, agents, workers, job drivers). Its clients (``query``) run in child
processes, so a test process never becomes a driver of a cluster whose nodes it kills.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.launch.processes import alive, descendants

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# Plasma's floor; the tests move only small messages through the object store.
OBJECT_STORE_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 180.0
# Every client and node of the cluster: no token authentication (it would read and
# write ~/.ray), no usage reports, and a dead node noticed within a few seconds.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    """``with LocalRayCluster(...) as cluster:``, ``cluster.address`` (GCS),
    ``cluster.dashboard_url`` (Jobs API, with ``dashboard=True``), ``cluster.env`` (the
    environment its clients run with)."""

    def __init__(
        self, *, num_cpus: int = 2, dashboard: bool = False,
        resources: dict[str, float] | None = None,
    ) -> None:  # fmt: skip
        # Short: Ray's socket paths under it must fit AF_UNIX's 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lq-ray-", dir="/tmp"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **CLUSTER_ENV}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        self.node_manager_ports: list[int] = []
        self._started: set[int] = set()
        head = [
            "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            f"--include-dashboard={str(dashboard).lower()}",
            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}",
        ]  # fmt: skip
        try:
            self._start(head, num_cpus=num_cpus, resources=resources)
        except BaseException:
            self.stop()
            raise

    def add_node(self, *, num_cpus: int, resources: dict[str, float] | None = None) -> int:
        """Start another raylet on this machine, joined to the head: a distinct Ray node.
        Returns its index in ``nodes``."""
        self._start([f"--address={self.address}"], num_cpus=num_cpus, resources=resources)
        return len(self.nodes) - 1

    def _start(self, extra: list[str], *, num_cpus: int, resources: dict | None) -> None:
        node_manager_port = free_port()
        ports = (
            "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "metrics-export-port", "runtime-env-agent-port",
        )  # fmt: skip
        command = [
            *RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus}",
            "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--node-manager-port={node_manager_port}",
            *[f"--{name}={free_port()}" for name in ports],
            *extra, *([f"--resources={json.dumps(resources)}"] if resources else []),
        ]  # fmt: skip
        with open(self.temp_dir / f"node{len(self.nodes)}.log", "wb") as log:
            node = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.nodes.append(node)
        self.node_manager_ports.append(node_manager_port)
        self._started.add(node.pid)
        self._wait_for_nodes(sum(n.poll() is None for n in self.nodes))

    def _wait_for_nodes(self, count: int) -> None:
        """Until the GCS lists ``count`` live nodes."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.nodes[-1].poll() is not None:
                log = (self.temp_dir / f"node{len(self.nodes) - 1}.log").read_text()
                raise RuntimeError(f"a ray node exited at start:\n{log[-3000:]}")
            try:
                if self.query("sum(n['Alive'] for n in ray.nodes())", timeout_s=30) >= count:
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{count} ray nodes did not start in {START_TIMEOUT_S:.0f} s")

    def query(self, expression: str, *, timeout_s: float = 120.0):
        """``expression`` (JSON-able; ``ray`` in scope), evaluated by a client of this
        cluster in a child process."""
        code = (
            "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR');"
            f"print(json.dumps({expression}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, self.address], capture_output=True, text=True,
            env=self.env, timeout=timeout_s,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"ray query {expression!r} failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.splitlines()[-1])

    def node_ids(self) -> list[str]:
        """The Ray node id of each of ``nodes``, by index."""
        by_port = self.query("{n['NodeManagerPort']: n['NodeID'] for n in ray.nodes()}")
        return [by_port[str(port)] for port in self.node_manager_ports]

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index``'s raylet (the node dies; its workers follow)."""
        tree = descendants(self.nodes[index].pid)
        self._started |= tree
        for pid in tree:
            if _name(pid) == "raylet":
                os.kill(pid, signal.SIGKILL)
                return
        raise RuntimeError(f"node {index} has no raylet")

    def stop(self) -> None:
        """SIGTERM every process this cluster started and all below them, then SIGKILL
        what is left after a grace period."""
        pids = set(self._started)
        for pid in self._started:
            pids |= descendants(pid)
        for sig, grace_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for pid in filter(alive, pids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.2)
        for node in self.nodes:
            node.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
