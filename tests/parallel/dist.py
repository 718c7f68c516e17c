"""Run a function in several gloo (or NCCL) processes on this machine and collect what each returns.

The parent hosts the rendezvous store on a port the OS picks (bind to port 0),
so there is no hard-coded port and no window in which another process can take
it. Each spawned process imports torch (about two seconds), so a test should
group several checks into one spawned function rather than spawn per check.
"""

from __future__ import annotations

import datetime
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    backend: str = "gloo",
) -> list[Any]:
    """Call ``fn(*args, rank=r, world_size=world_size, group=g)`` in ``world_size`` processes.

    fn: a module-level (picklable) function; ``g`` is the process group of all the
        processes, already initialised.
    backend: ``"gloo"``, or ``"nccl"`` (rank ``r`` then runs on CUDA device ``r``).
    Returns the ranks' results in rank order (they must be picklable).
    Raises RuntimeError with the failing rank's traceback if any rank raises
    or dies, and TimeoutError if the ranks have not all finished within
    ``timeout_s`` seconds; either way every child is killed, none is left hanging.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)
    context = mp.get_context("spawn")
    reports = context.Queue()
    processes = [
        context.Process(
            target=_child,
            args=(fn, tuple(args), rank, world_size, store.port, timeout_s, reports, backend),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    try:
        for process in processes:
            process.start()
        while len(results) < world_size:
            try:
                rank, ok, payload = reports.get(timeout=0.1)
            except queue.Empty:
                _check_alive(processes, results)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - results.keys())
                    raise TimeoutError(
                        f"ranks {missing} of {world_size} did not finish within {timeout_s} s"
                    ) from None
                continue
            if not ok:
                # A peer that crashed first is the likelier cause; name it too.
                crashed = [
                    f"rank {r} exited with code {p.exitcode} without reporting"
                    for r, p in enumerate(processes)
                    if r not in results and r != rank and p.exitcode not in (None, 0)
                ]
                note = "".join(f"\n({c})" for c in crashed)
                raise RuntimeError(f"rank {rank} of {world_size} raised:\n{payload}{note}")
            results[rank] = pickle.loads(payload)
        for process in processes:
            process.join(timeout=5.0)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5.0)
        reports.close()
    return [results[rank] for rank in range(world_size)]


def _check_alive(processes: list[Any], results: dict[int, Any]) -> None:
    """Raise if a rank exited without reporting (a crash that bypassed ``except``)."""
    for rank, process in enumerate(processes):
        if rank not in results and process.exitcode is not None:
            raise RuntimeError(
                f"rank {rank} of {len(processes)} exited with code {process.exitcode} "
                "without reporting a result"
            )


def _child(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    reports: Any,
    backend: str,
) -> None:
    try:
        # One CPU thread per rank: ranks that each take every core contend with one
        # another (and with gloo's polling) and run tiny models over ten times slower.
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore(_HOST, port, is_master=False)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = fn(*args, rank=rank, world_size=world_size, group=dist.group.WORLD)
        # Plain pickle copies tensors; torch's queue reducers would share memory that
        # disappears when this process exits.
        report = (rank, True, pickle.dumps(result))
    except BaseException:
        # Report before any teardown: tearing down while peers wait in a collective can block.
        reports.put((rank, False, traceback.format_exc()))
        return
    reports.put(report)
    dist.destroy_process_group()
