"""Ray launcher: one actor per GPU (or per CPU slot) in a placement group on one node.

The actors form a torch.distributed group (NCCL on GPUs, gloo on CPUs) at an
address rank 0 picks, then each runs an engine with
:class:`~longquest.parallel.worker.SequenceParallelRanks`, built from the one
:class:`~longquest.engine.config.EngineConfig` every rank receives unchanged. The driver
sends small typed requests (token ids and sampling parameters) to typed methods
and receives small typed results; tensors move only between the actors, over the
process group, never through Ray's object store.

``ray.init`` joins the cluster named by ``RAY_ADDRESS`` when it is set, otherwise
starts a local one with the dashboard off.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from longquest.engine.config import EngineConfig, SamplingParams
from longquest.engine.scheduler import NewRequest, Scheduler, StepResult
from longquest.engine.sequence import RequestOutput
from longquest.launch.ray_devices import group_devices

# Ray's own start-up on a busy 2-core machine can take a while; forming the group is quick.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True, kw_only=True)
class WorkerSetup:
    """Everything a rank needs to join the group and load the model."""

    config: EngineConfig
    rank: int
    master_addr: str
    master_port: int
    use_gpu: bool
    timeout_s: float
    # On GPUs: the group's GPUs on this rank's node and its own among them (ray_devices).
    visible_devices: str | None = None
    device_index: int = 0


def worker_setups(
    config: EngineConfig, *, master_addr: str, master_port: int, use_gpu: bool, timeout_s: float
) -> list[WorkerSetup]:
    """One WorkerSetup a rank, each carrying the same config: ``config`` with its model
    directory made absolute, so every actor (whatever its working directory) finds it."""
    config = dataclasses.replace(config, model=str(Path(config.model).resolve()))
    return [
        WorkerSetup(
            config=config,
            rank=rank,
            master_addr=master_addr,
            master_port=master_port,
            use_gpu=use_gpu,
            timeout_s=timeout_s,
        )
        for rank in range(config.parallel.world_size)
    ]


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    prompts: list[list[int]]
    params: list[SamplingParams]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU
    quota (a container may see all of its host's cores but be allowed a few)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = cores or os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def cpu_threads() -> int:
    """Torch threads for a CPU actor: its share of the node's cores, as its Ray CPU slots
    are a share of the node's slots, so the actors of every replica on a node (whatever
    the layout) share its cores instead of each taking all of them."""
    context = ray.get_runtime_context()
    slots = context.get_assigned_resources().get("CPU", 1.0)
    node = next((n for n in ray.nodes() if n.get("NodeID") == context.get_node_id()), {})
    node_slots = node.get("Resources", {}).get("CPU", 0) or slots
    return max(1, int(usable_cores() * slots / node_slots))


class RankWorker:
    """The body of one Ray actor: one rank of a replica (``build_worker`` places it on the
    tensor and sequence axes)."""

    def __init__(self) -> None:
        self.engine = None
        self.scheduler = None

    def address(self) -> tuple[str, int]:
        """A reachable address of this node and a free port for the group's store."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return host, port

    def placement(self) -> tuple[str, list[str]]:
        """This actor's Ray node id and the GPU ids Ray gave it."""
        gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
        return ray.get_runtime_context().get_node_id(), gpus

    def setup(self, setup: WorkerSetup) -> int:
        import datetime

        import torch
        import torch.distributed as dist

        from longquest.parallel.worker import build_worker

        device_index = 0  # Ray pins one GPU per actor through CUDA_VISIBLE_DEVICES
        if setup.use_gpu:
            if setup.visible_devices is not None and not torch.cuda.is_initialized():
                # The group's GPUs on this node, so peer memory can map them.
                os.environ["CUDA_VISIBLE_DEVICES"] = setup.visible_devices
                device_index = setup.device_index
            torch.cuda.set_device(device_index)
        else:
            torch.set_num_threads(cpu_threads())
        dist.init_process_group(
            backend="nccl" if setup.use_gpu else "gloo",
            init_method=f"tcp://{setup.master_addr}:{setup.master_port}",
            rank=setup.rank,
            world_size=setup.config.parallel.world_size,
            timeout=datetime.timedelta(seconds=setup.timeout_s),
        )
        self.engine, _ = build_worker(
            setup.config,
            group=dist.group.WORLD,
            rank=setup.rank,
            device=f"cuda:{device_index}" if setup.use_gpu else "cpu",
        )
        self.scheduler = Scheduler(self.engine)
        return os.getpid()

    def generate(self, request: GenerateRequest) -> list[RequestOutput] | ValueError:
        # Bad input is an answer, not a failure: every rank refuses it the same way
        # before any collective, and the group stays usable.
        try:
            return self.engine.generate(request.prompts, request.params)
        except ValueError as error:
            return error

    def step(self, new: list[NewRequest]) -> StepResult:
        """One step of this rank's scheduler with ``new`` added (refused ones come back
        in ``refused``). Every actor of the group gets the same ``new`` in the same step."""
        return self.scheduler.step(new)

    def pid(self) -> int:
        return os.getpid()

    def peer_memory(self) -> bool:
        """Whether this rank's decode collectives go over peer memory (else the group's
        backend): the sequence axis's, or the tensor axis's where there is no other."""
        comms = (self.engine.comm, self.engine.model.tensor)
        return any(getattr(comm, "peer", None) is not None for comm in comms)


def init_ray(*, num_cpus: int) -> bool:
    """Join the cluster ``RAY_ADDRESS`` names, else start a local Ray with at least
    ``num_cpus`` CPU slots; nothing when Ray is already up. True when this call started
    a Ray (its caller stops it)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=True,
        **({} if address else {"num_cpus": max(os.cpu_count() or 1, num_cpus)}),
    )
    return not address


class RayCluster:
    """``config.parallel.world_size`` RankWorker actors driven from this process, in one
    placement group that Ray keeps on one node (``STRICT_PACK``): one replica."""

    def __init__(self, config: EngineConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        # A Ray this cluster starts, shutdown() stops: every launcher calls it in a
        # ``finally``, which SIGTERM reaches too (Ray's driver handler raises SystemExit).
        self._owns_ray = init_ray(num_cpus=config.parallel.world_size)
        self.timeout_s = timeout_s
        try:
            self._start(config)
        except BaseException:  # a failed or interrupted start leaves no actor or Ray behind
            self.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        """Place and start the rank actors and set up their engines."""
        world_size, device, timeout_s = config.parallel.world_size, config.device, self.timeout_s
        gpus = ray.cluster_resources().get("GPU", 0)
        # EngineConfig has checked the device's form; None means CUDA when there is one.
        use_gpu = (device is None and gpus >= 1) or str(device).startswith("cuda")
        if use_gpu and gpus < world_size:
            raise ValueError(
                f"device {device or 'cuda'}: world_size={world_size} needs {world_size} GPUs "
                f"but the Ray cluster has {gpus:g}; lower world_size, add GPUs, or use "
                "--device cpu"
            )
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        # One node: the ranks exchange every decode step's collectives.
        self._group = placement_group([bundle] * world_size, strategy="STRICT_PACK")
        try:
            ray.get(self._group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            raise RuntimeError(
                f"Ray could not place {world_size} workers ({bundle} each) within "
                f"{timeout_s:.0f} s; cluster resources: {ray.cluster_resources()}"
            ) from error
        actor_class = ray.remote(RankWorker)
        self.actors = [
            actor_class.options(
                num_gpus=1 if use_gpu else 0,
                num_cpus=1,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._group, placement_group_bundle_index=rank
                ),
            ).remote()
            for rank in range(world_size)
        ]
        host, port = ray.get(self.actors[0].address.remote(), timeout=timeout_s)
        setups = worker_setups(
            config, master_addr=host, master_port=port, use_gpu=use_gpu, timeout_s=timeout_s
        )
        placed = self._call([a.placement.remote() for a in self.actors], "placement")
        self.node_ids = [node for node, _ in placed]  # rank order
        if use_gpu:
            devices = group_devices(node_ids=[n for n, _ in placed], gpu_ids=[g for _, g in placed])
            setups = [replace(s, **asdict(d)) for s, d in zip(setups, devices)]
        self._call([a.setup.remote(s) for a, s in zip(self.actors, setups)], "setup")

    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        """Every rank runs the same requests; rank 0's results are returned."""
        request = GenerateRequest(prompts=prompts, params=params)
        results = self._call([a.generate.remote(request) for a in self.actors], "generate")
        if isinstance(results[0], ValueError):
            raise results[0]
        return results[0]

    def step(self, new: list[NewRequest]) -> StepResult:
        """One engine step on every rank with ``new`` added; rank 0's result. A failure
        tears the workers down (see ``_call``)."""
        return self._call(self.start_step(new), "step")[0]

    def start_step(self, new: list[NewRequest]) -> list:
        """Start one step on every rank; its ObjectRefs, rank 0's first (its StepResult
        is the group's). The caller waits on them (``ray.wait``)."""
        return [a.step.remote(new) for a in self.actors]

    def worker_pids(self) -> list[int]:
        return self._call([a.pid.remote() for a in self.actors], "pid")

    def _call(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        """Wait for every rank; the first failure (a dead actor, an exception) is raised
        at once, the workers are torn down, and nothing waits on the survivors, which
        would otherwise block in a collective."""
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as error:
                    rank = refs.index(ref)
                    self.shutdown()
                    raise RuntimeError(
                        f"longquest worker rank {rank} failed during {what}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
            if deadline is not None and time.monotonic() > deadline:
                self.shutdown()
                raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
        return ray.get(refs)

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        self.actors = []
        if getattr(self, "_group", None) is not None:
            remove_placement_group(self._group)
            self._group = None
        if getattr(self, "_owns_ray", False):
            self._owns_ray = False
            ray.shutdown()
