"""Data-parallel replicas on Ray: ``data_parallel_size`` groups of ``world_size`` actors.

Each replica is a :class:`~longquest.launch.ray_cluster.RayCluster`: one placement group
of ``world_size`` bundles that Ray keeps on one node (``STRICT_PACK``); the replicas are
free to spread over the cluster's nodes. Before any actor starts, the cluster's nodes
are checked to hold every replica (GPUs, or CPU slots for CPU actors), and a clear error
says what is missing. :class:`~longquest.launch.dispatch.ReplicaFeeder` feeds them.
"""

from __future__ import annotations

import threading

import ray

from longquest.engine.config import EngineConfig
from longquest.launch import ray_cluster
from longquest.launch.ray_cluster import DEFAULT_TIMEOUT_S, init_ray


def uses_gpu(device: str | None, cluster_gpus: float) -> bool:
    """Whether the actors take GPUs: ``device`` says CUDA, or says nothing and the
    cluster has GPUs."""
    return (device is None and cluster_gpus >= 1) or str(device).startswith("cuda")


def replicas_that_fit(nodes: list[dict], *, world_size: int, use_gpu: bool) -> list[int]:
    """How many replicas of ``world_size`` bundles (1 GPU and 1 CPU each, or 1 CPU) each
    living node of ``nodes`` (``ray.nodes()``) holds."""
    fits = []
    for node in nodes:
        if not node.get("Alive", True):
            continue
        resources = node.get("Resources", {})
        slots = resources.get("CPU", 0)
        if use_gpu:
            slots = min(slots, resources.get("GPU", 0))
        fits.append(int(slots // world_size))
    return fits


def check_capacity(nodes: list[dict], *, replicas: int, world_size: int, use_gpu: bool) -> None:
    """Raise ValueError naming what is missing when ``nodes`` cannot hold ``replicas``
    replicas of ``world_size`` actors, each replica on one node."""
    fits = replicas_that_fit(nodes, world_size=world_size, use_gpu=use_gpu)
    if sum(fits) >= replicas:
        return
    unit = "GPU" if use_gpu else "CPU slot"
    held = ", ".join(
        f"{n.get('Resources', {}).get('GPU' if use_gpu else 'CPU', 0):g}"
        for n in nodes
        if n.get("Alive", True)
    )
    raise ValueError(
        f"{replicas} replicas of {world_size} actors (--data-parallel-size {replicas} "
        f"--world-size {world_size}) need {replicas * world_size} {unit}s, {world_size} on "
        f"one node for each replica; the Ray cluster's nodes have {held or 'none'} "
        f"{unit}s, room for {sum(fits)} replicas. Lower --data-parallel-size or "
        f"--world-size, or add nodes" + (", or use --device cpu" if use_gpu else "")
    )


def start_replicas(config: EngineConfig, *, timeout_s: float) -> list[ray_cluster.RayCluster]:
    """Start ``data_parallel_size`` RayClusters side by side (each loads the model), one
    thread each. On any failure, or an interrupt, the ones started are shut down (a
    thread still starting shuts its own down when it gets there) and the error raised."""
    results: list = [None] * config.parallel.data_parallel_size
    abandoned = threading.Event()

    def start(index: int) -> None:
        try:
            results[index] = ray_cluster.RayCluster(config, timeout_s=timeout_s)
        except BaseException as error:  # noqa: BLE001 - raised by the caller
            results[index] = error
            return
        if abandoned.is_set():
            results[index].shutdown()

    threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(len(results))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        abandoned.set()
        _shut_down([r for r in results if isinstance(r, ray_cluster.RayCluster)])
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        _shut_down([r for r in results if not isinstance(r, BaseException)])
        raise errors[0]
    return results


def _shut_down(clusters: list) -> None:
    for cluster in clusters:
        cluster.shutdown()


class ReplicaSet:
    """``config.parallel.data_parallel_size`` replicas, each a RayCluster of
    ``config.parallel.world_size`` actors built from the same config."""

    def __init__(self, config: EngineConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        replicas, world_size = config.parallel.data_parallel_size, config.parallel.world_size
        self.clusters: list[ray_cluster.RayCluster] = []
        # A Ray this set starts, shutdown() stops (launchers call it in a ``finally``).
        self._owns_ray = init_ray(num_cpus=replicas * world_size)
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            check_capacity(
                ray.nodes(), replicas=replicas, world_size=world_size,
                use_gpu=uses_gpu(config.device, gpus),
            )  # fmt: skip
            self.clusters = start_replicas(config, timeout_s=timeout_s)
        except BaseException:  # a failed or interrupted start leaves no actor or Ray behind
            self.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.clusters)

    def worker_pids(self) -> list[list[int]]:
        """Each replica's actors' process ids, rank order."""
        return [cluster.worker_pids() for cluster in self.clusters]

    def shutdown(self) -> None:
        """Kill every replica's actors, and stop Ray if this set started it."""
        for cluster in self.clusters:
            cluster.shutdown()
        self.clusters = []
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()
