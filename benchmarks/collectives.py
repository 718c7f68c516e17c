"""Latency of the small collectives a decode step makes, inside a CUDA graph.

    torchrun --standalone --nproc-per-node 2 benchmarks/collectives.py

A decode step of the sequence-parallel engine makes about 2 collectives a layer
(the global top-k all-gather and the partial-attention all-gather) on tens to
hundreds of KB. This script captures ``--repeats`` back-to-back copies of one
collective in a CUDA graph and reports the replay time divided by the repeats,
for NCCL (all-gather, all-reduce), for the engine's peer-memory kernel
(``longquest.parallel.peer``) and for torch symmetric memory (a one-shot
all-reduce over peer buffers: an all-gather is a sum of zero-padded slots).
Run it under different NCCL settings (e.g. ``NCCL_PROTO=LL``) to compare them.
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import capture_graph, write_result  # noqa: E402
from longquest.kernels.peer import peer_exchange  # noqa: E402
from longquest.parallel.peer import PeerCollectives  # noqa: E402


def graph_us(fn, *, repeats: int, replays: int, group) -> float:
    """Median microseconds of one ``fn`` call, from a graph of ``repeats`` calls."""
    graph = capture_graph(lambda: [fn() for _ in range(repeats)])
    dist.barrier(group)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / repeats)
    del graph
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kb", default="16,64,132,256")
    parser.add_argument("--sweep-kb", type=int, default=132, help="size of the programs sweep")
    parser.add_argument("--repeats", type=int, default=64)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--label", default=os.environ.get("NCCL_PROTO", "default"))
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    group = dist.group.WORLD
    rows = []

    def record(kind: str, size_kb: int, fn) -> None:
        try:
            us = graph_us(fn, repeats=args.repeats, replays=args.replays, group=group)
        except Exception as error:  # noqa: BLE001 - a probe reports what does not work
            us = None
            if rank == 0:
                print(f"{kind} {size_kb} KB: {type(error).__name__}: {error}"[:300], flush=True)
        rows.append({"collective": kind, "size_kb": size_kb, "us": us})
        if rank == 0 and us is not None:
            print(f"{kind:<34} {size_kb:>5} KB  {us:8.2f} us", flush=True)

    symm = None
    try:
        import torch.distributed._symmetric_memory as symm

        symm.enable_symm_mem_for_group(group.group_name)
    except Exception as error:  # noqa: BLE001
        if rank == 0:
            print(f"no symmetric memory: {error}", flush=True)
        symm = None

    peer = PeerCollectives.create(group=group, rank=rank, world_size=world, device=device)

    def probe(size_kb: int) -> None:
        n = size_kb * 1024 // 4
        local = torch.randn(n, device=device)
        gathered = torch.empty(world * n, device=device)
        record("nccl all_gather fp32", size_kb,
               lambda: dist.all_gather_into_tensor(gathered, local, group=group))  # fmt: skip
        half = torch.randn(2 * n, device=device, dtype=torch.bfloat16)
        record("nccl all_reduce bf16", size_kb, lambda: dist.all_reduce(half, group=group))
        if peer is not None:
            peer.fits(local.numel() * 4)  # grow outside the capture
            record("peer all_gather fp32", size_kb, lambda: peer.all_gather(local))
            record("peer all_reduce bf16", size_kb, lambda: peer.all_reduce(half))
            if size_kb == args.sweep_kb:  # how many programs split the payload
                bases, counters, slot_bytes = peer.buffers()
                out = local.new_empty(world, n)
                for programs in (1, 2, 4, 8, 16, 32):
                    record(f"peer all_gather fp32 programs={programs}", size_kb,
                           lambda p=programs: peer_exchange(
                               src=local, out=out, bases=bases, counters=counters, rank=rank,
                               slot_bytes=slot_bytes, reduce=False, programs=p))  # fmt: skip
            dist.all_gather_into_tensor(gathered, local, group=group)
            same = torch.equal(peer.all_gather(local).view(-1), gathered)
            if rank == 0:
                print(f"  peer gather equals NCCL: {same}", flush=True)
        if symm is None:
            return
        # All-gather as a one-shot sum: each rank writes only its own slot of a
        # zeroed symmetric buffer, so the sum over ranks is the concatenation.
        slots = symm.empty(world, n, dtype=torch.float32, device=device)
        slots.zero_()
        symm.rendezvous(slots, group.group_name)
        dist.barrier(group)

        def one_shot_gather() -> torch.Tensor:
            slots[rank].copy_(local)
            return torch.ops.symm_mem.one_shot_all_reduce(slots, "sum", group.group_name)

        record("symm one_shot gather fp32", size_kb, one_shot_gather)
        buffer = symm.empty(2 * n, dtype=torch.bfloat16, device=device)
        symm.rendezvous(buffer, group.group_name)

        def one_shot_reduce() -> torch.Tensor:
            buffer.copy_(half)
            return torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", group.group_name)

        record("symm one_shot all_reduce bf16", size_kb, one_shot_reduce)
        try:
            result = one_shot_gather()
            expect = torch.empty(world * n, device=device)
            dist.all_gather_into_tensor(expect, local, group=group)
            if rank == 0:
                print(f"  one-shot gather equals NCCL: {torch.equal(result.view(-1), expect)}")
        except Exception as error:  # noqa: BLE001
            if rank == 0:
                print(f"  check failed: {error}"[:300])

    for size_kb in (int(s) for s in args.sizes_kb.split(",")):
        probe(size_kb)

    if rank == 0:
        result = {
            "world_size": world,
            "repeats_in_graph": args.repeats,
            "nccl_proto": os.environ.get("NCCL_PROTO"),
            "rows": rows,
        }
        path = write_result(f"collectives-w{world}-{args.label}", result, out_dir=args.out_dir)
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
