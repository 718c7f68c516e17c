"""Sequence parallelism on GPUs: equivalence with one device, and a context past one GPU.

Run with torchrun, one process per GPU (NCCL):

    torchrun --nproc-per-node 2 benchmarks/sp_check.py --out-dir benchmarks/results

1. Equivalence: a Llama-3.1-8B-shaped model with random bf16 weights; a real prefill of a
   random prompt and 64 greedy decode steps, dense and Quest, on all ranks (sequence
   parallel) and on rank 0 alone (single device, same weights). Tokens are compared; at
   the first divergence, the single device's top-2 logprob margin shows whether it was
   a bf16 near-tie.
2. Capacity: the single-device engine, with its cache sized from free GPU memory,
   refuses a context of ``--long-context`` tokens (default: 1.3x what one GPU holds,
   at least 1.2M); the sequence-parallel engine fills that context synthetically
   (benchmarks.synthetic.fill_synthetic: seeded random K/V per page, exact
   bounds) and decodes from it, Quest and dense, timing each step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import (  # noqa: E402
    decode_steps,
    fill_synthetic,
    llama31_8b_config,
    random_model,
)
from longquest.engine.builder import cache_pages  # noqa: E402
from longquest.engine.cache import CacheCapacityError, CacheShape, KVCache  # noqa: E402
from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams  # noqa: E402
from longquest.engine.engine import LLMEngine  # noqa: E402
from longquest.parallel.comm import SequenceParallelComm  # noqa: E402
from longquest.parallel.ownership import PageOwnership  # noqa: E402
from longquest.parallel.worker import SequenceParallelRanks  # noqa: E402

DTYPE = torch.bfloat16


def log(rank: int, *parts) -> None:
    if rank == 0:
        print(*parts, flush=True)


def make_engine(model, config, quest, *, num_pages, device, group=None, rank=0, world=1):
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=num_pages,
        page_size=quest.page_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=DTYPE,
    )
    common = dict(
        model=model,
        model_config=config,
        cache=KVCache(shape, device=device),
        quest=quest,
        detokenize=lambda ids: "",
        eos_token_ids=(),
        prefill_chunk_tokens=8192,
    )
    if group is None:
        return LLMEngine(**common)
    ranks = SequenceParallelRanks(
        group=group,
        ownership=PageOwnership(world_size=world, page_size=quest.page_size,
                                prefill_chunk_tokens=8192),
        world_size=world,
        rank=rank,
        comm=SequenceParallelComm(group=group, rank=rank, world_size=world),
        device=device,
    )  # fmt: skip
    return LLMEngine(ranks=ranks, **common)


def free() -> None:
    """Return freed cache memory to the device (callers ``del`` their references first)."""
    gc.collect()
    torch.cuda.empty_cache()


def equivalence(model, config, *, rank, world, group, device, prompt_len, steps) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=steps, ignore_eos=True, logprobs=5)
    rows = []
    for name, quest in (
        ("dense", QuestConfig(token_budget=None)),
        ("quest-1024", QuestConfig(token_budget=1024)),
    ):
        pages = (prompt_len + steps) // 16 + 64
        engine = make_engine(model, config, quest, num_pages=pages, device=device,
                             group=group, rank=rank, world=world)  # fmt: skip
        start = time.perf_counter()
        (sp,) = engine.generate([prompt], [params])
        sp_seconds = time.perf_counter() - start
        del engine
        free()
        dist.barrier()
        if rank == 0:
            single_engine = make_engine(model, config, quest, num_pages=pages, device=device)
            (single,) = single_engine.generate([prompt], [params])
            del single_engine
            free()
            same = 0
            while same < steps and sp.token_ids[same] == single.token_ids[same]:
                same += 1
            row = {"mode": name, "prompt_tokens": prompt_len, "steps": steps,
                   "identical_prefix": same, "all_identical": same == steps,
                   "sp_seconds": round(sp_seconds, 3)}  # fmt: skip
            # How close the two runs' distributions are before any divergence.
            diffs = [abs(a[t] - b[t]) for a, b in zip(sp.logprobs[:same], single.logprobs[:same])
                     for t in a if t in b]  # fmt: skip
            row["max_logprob_diff_before_divergence"] = max(diffs) if diffs else None
            if same < steps:
                ranked = sorted(single.logprobs[same].values(), reverse=True)
                row["divergence_step"] = same
                row["single_top2_margin"] = ranked[0] - ranked[1] if len(ranked) > 1 else None
                row["sp_top2_margin"] = (lambda r: r[0] - r[1])(
                    sorted(sp.logprobs[same].values(), reverse=True)
                )
            rows.append(row)
            print("equivalence", json.dumps(row), flush=True)
        dist.barrier()
    return rows


def capacity_and_long_decode(model, config, *, rank, world, group, device, context, steps):
    quest = QuestConfig(token_budget=4096)
    result: dict = {}
    # One GPU, cache from free memory: the single-device engine's own sizing.
    single_pages = cache_pages(config=config, cache=CacheConfig(), page_size=16, dtype=DTYPE,
                               device=device, world_size=1)  # fmt: skip
    single_tokens = single_pages * 16
    if context is None:
        context = max(1_200_000, int(1.3 * single_tokens))
    result["single_gpu_capacity_tokens"] = single_tokens
    result["context_tokens"] = context
    if rank == 0:
        single = make_engine(model, config, quest, num_pages=single_pages, device=device)
        try:
            fill_synthetic(single, context_tokens=context)
            result["single_gpu_refused"] = False
        except CacheCapacityError as error:
            result["single_gpu_refused"] = True
            result["single_gpu_message"] = str(error)
        del single
        free()
        log(rank, "single GPU:", json.dumps(result))
    dist.barrier()
    pages = cache_pages(config=config, cache=CacheConfig(), page_size=16, dtype=DTYPE,
                        device=device, world_size=world)  # fmt: skip
    timings = {}
    for name, q in (("quest-4096", quest), ("quest-2048", QuestConfig(token_budget=2048)),
                    ("dense-sp", QuestConfig(token_budget=None))):  # fmt: skip
        engine = make_engine(model, config, q, num_pages=pages, device=device,
                             group=group, rank=rank, world=world)  # fmt: skip
        start = time.perf_counter()
        seq = fill_synthetic(
            engine,
            context_tokens=context,
            params=SamplingParams(max_tokens=steps + 8, ignore_eos=True),
        )
        fill_s = time.perf_counter() - start
        times = decode_steps(engine, [seq], launches=steps)
        warm = times[2:] or times
        timings[name] = {
            "ms_per_token_median": round(1000 * statistics.median(warm), 3),
            "ms_per_token_min": round(1000 * min(warm), 3),
            "fill_seconds": round(fill_s, 1),
            "tokens": seq.output[: steps + 1],
            "local_pages": len(seq.local_pages),
            "pool_pages_per_rank": pages,
        }
        log(rank, name, json.dumps({k: v for k, v in timings[name].items() if k != "tokens"}))
        del engine, seq
        free()
        dist.barrier()
    result["decode"] = timings
    q, d = timings["quest-4096"], timings["dense-sp"]
    result["quest_vs_dense_speedup"] = round(d["ms_per_token_median"] / q["ms_per_token_median"], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--long-context", type=int, default=None)
    parser.add_argument("--long-steps", type=int, default=12)
    parser.add_argument("--skip-equivalence", action="store_true")
    parser.add_argument("--skip-long", action="store_true", help="equivalence only")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    group = dist.group.WORLD
    config = llama31_8b_config()
    model = random_model(config, dtype=DTYPE, device=device, seed=0)
    report = {"world_size": world, "model": "Llama-3.1-8B shape, random bf16 weights"}
    if not args.skip_equivalence:
        report["equivalence"] = equivalence(
            model, config, rank=rank, world=world, group=group, device=device,
            prompt_len=args.prompt_tokens, steps=args.steps,
        )  # fmt: skip
    if not args.skip_long:
        report["long_context"] = capacity_and_long_decode(
            model, config, rank=rank, world=world, group=group, device=device,
            context=args.long_context, steps=args.long_steps,
        )  # fmt: skip
    if rank == 0:
        from benchmarks.common import write_result

        path = write_result("sp_check", report, out_dir=args.out_dir)
        print("wrote", path)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
