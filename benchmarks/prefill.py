"""Exact prefill throughput and MFU, and the context-parallel attention strategy compared.

Run one process per GPU (NCCL); ``--nproc-per-node 1`` is the single-GPU engine:

    torchrun --nproc-per-node 2 benchmarks/prefill.py --contexts 262144

Part 1 (``--part engine``): a Llama-3.1-8B-shaped model with random bf16 weights
prefills a random prompt of N tokens through the engine's own path (chunked exact
prefill on one GPU; pass-Q context-parallel rounds on several), timed end to end.
MFU = model FLOPs / (seconds x world_size x the bf16 matmul rate measured in this
run on an 8192^3 ``torch.matmul``); model FLOPs = 2 x (non-embedding parameters) x N
+ causal attention 2 x 2 x num_layers x (N^2 / 2) x num_qo_heads x head_dim.

Part 2 (``--part strategies``, 2+ GPUs): one attention layer of one prefill round
(``--round`` new tokens, zigzag over ranks) against ``--past`` earlier tokens spread
over the ranks, three exact ways, each checked against the others:
  - ``pass_q``  (the engine's): all-gather the round's queries, attend to local keys,
    all-to-all the partial (out, lse) back, log-sum-exp merge;
  - ``ring``: world_size - 1 send/recv steps of each rank's K/V around the ring,
    attention to each block in hand, merged as it goes;
  - ``allgather_kv``: all-gather every rank's K/V, attend locally.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longquest.engine.cache import CacheShape, KVCache  # noqa: E402
from longquest.engine.config import QuestConfig, SamplingParams  # noqa: E402
from longquest.engine.engine import LLMEngine  # noqa: E402
from longquest.engine.synthetic import llama31_8b_config, random_model  # noqa: E402
from longquest.kernels import merge_attention_states, prefill_attention  # noqa: E402
from longquest.parallel.comm import SequenceParallelComm  # noqa: E402
from longquest.parallel.ownership import PageOwnership  # noqa: E402
from longquest.parallel.worker import SequenceParallelEngine  # noqa: E402

PAGE = 16
CHUNK = 8192


def log(rank: int, *parts) -> None:
    if rank == 0:
        print(*parts, flush=True)


def matmul_tflops(device) -> float:
    """Best bf16 8192^3 matmul rate of several, TFLOP/s."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return 2 * 8192**3 / (best * 1e-3) / 1e12


def model_flops(config, model, tokens: int) -> float:
    params = sum(p.numel() for p in model.parameters())
    dense = 2 * (params - config.vocab_size * config.hidden_size) * tokens
    attention = (
        4 * config.num_layers * (tokens * tokens / 2) * config.num_qo_heads * config.head_dim
    )
    return dense + attention


def engine_part(model, config, *, contexts, rank, world, group, device, peak) -> list[dict]:
    rows = []
    for tokens in contexts:
        pages = -(-tokens // (PAGE * world)) + 2 * CHUNK // PAGE + 64
        shape = CacheShape(num_layers=config.num_layers, num_pages=pages, page_size=PAGE,
                           num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                           dtype=torch.bfloat16)  # fmt: skip
        need = shape.num_layers * pages * (2 * PAGE + 2) * config.num_kv_heads
        need *= config.head_dim * 2
        free = torch.cuda.mem_get_info(device)[0]
        if need > free - 6 * 2**30:
            rows.append({"context": tokens, "skipped": f"KV needs {need / 2**30:.0f} GiB a rank"})
            log(rank, rows[-1])
            continue
        common = dict(model=model, model_config=config, cache=KVCache(shape, device=device),
                      quest=QuestConfig(token_budget=None), detokenize=lambda ids: "",
                      eos_token_ids=(), prefill_chunk_tokens=CHUNK)  # fmt: skip
        if world == 1:
            engine = LLMEngine(**common)
        else:
            engine = SequenceParallelEngine(
                group=group, world_size=world, rank=rank,
                ownership=PageOwnership(world_size=world, page_size=PAGE,
                                        prefill_chunk_tokens=CHUNK),
                comm=SequenceParallelComm(group=group, rank=rank, world_size=world),
                **common,
            )  # fmt: skip
        g = torch.Generator().manual_seed(tokens)
        prompt = torch.randint(0, config.vocab_size, (tokens,), generator=g).tolist()
        engine.generate([prompt[:4096]], [SamplingParams(max_tokens=1)])  # warm-up
        torch.cuda.synchronize()
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        engine.generate([prompt], [SamplingParams(max_tokens=1)])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        flops = model_flops(config, model, tokens)
        row = {"context": tokens, "seconds": round(seconds, 3),
               "tokens_per_second": round(tokens / seconds),
               "model_tflop": round(flops / 1e12, 1),
               "mfu": round(flops / (seconds * world * peak * 1e12), 4)}  # fmt: skip
        rows.append(row)
        log(rank, "prefill", row)
        del engine, common
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _attend(query, key, value, *, query_start, causal):
    return prefill_attention(query=query, key=key, value=value, query_start=query_start,
                             causal=causal)  # fmt: skip


def strategies_part(*, rank, world, group, device, past, round_tokens, repeats) -> dict:
    """One layer: each rank holds past/world earlier keys and round/world new tokens (its
    zigzag pair of chunks); every rank needs exact attention for its own queries."""
    hq, hkv, d = 32, 8, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    # Global tensors, identical on every rank (same seed), sliced per rank.
    total = past + round_tokens
    keys = torch.randn(total, hkv, d, device=device, dtype=dtype, generator=g)
    values = torch.randn(total, hkv, d, device=device, dtype=dtype, generator=g)
    queries = torch.randn(round_tokens, hq, d, device=device, dtype=dtype, generator=g)
    per = round_tokens // (2 * world)
    mine = [(rank * per, (rank + 1) * per),
            ((2 * world - 1 - rank) * per, (2 * world - rank) * per)]  # fmt: skip
    past_per = past // world
    my_past = slice(rank * past_per, (rank + 1) * past_per)
    my_q_rows = torch.cat([torch.arange(a, b, device=device) for a, b in mine])
    my_round_k = torch.cat([keys[past + a : past + b] for a, b in mine])
    my_round_v = torch.cat([values[past + a : past + b] for a, b in mine])
    my_k = torch.cat([keys[my_past], my_round_k])
    my_v = torch.cat([values[my_past], my_round_v])

    my_pos = torch.cat(
        [
            torch.arange(my_past.start, my_past.stop, device=device),
            *[torch.arange(past + a, past + b, device=device) for a, b in mine],
        ]
    )

    def partial(q_rows_global, k, v, k_pos):
        """Attention of round rows to (k, v) at positions k_pos, as (out, lse) fp32."""
        # Split keys into the unmasked prefix (positions before the round) and the
        # round part (masked by position); the kernel does each exactly.
        before = k_pos < past
        q = queries[q_rows_global]
        outs, lses = [], []
        if bool(before.any()):
            o, lse = _attend(q, k[before], v[before], query_start=0, causal=False)
            outs.append(o.float())
            lses.append(lse)
        in_round = ~before
        if bool(in_round.any()):
            kr, vr, pr = k[in_round], v[in_round], k_pos[in_round] - past
            # Keys of the round are at most two contiguous chunks: attend to each with
            # the causal offset of that chunk relative to each query row group.
            starts = torch.nonzero(torch.diff(pr, prepend=pr[:1] - 2) != 1).flatten().tolist()
            bounds = starts + [pr.numel()]
            for i in range(len(starts)):
                a, b = bounds[i], bounds[i + 1]
                first = int(pr[a])
                o, lse = _chunk_attend(q, q_rows_global, kr[a:b], vr[a:b], first)
                outs.append(o)
                lses.append(lse)
        merged, lse = merge_attention_states(outputs=torch.stack(outs), lses=torch.stack(lses))
        return merged.float(), lse

    def _chunk_attend(q, q_rows, k, v, first):
        """Queries at round rows q_rows against keys at round rows first..first+len."""
        length = k.shape[0]
        out = torch.zeros(q.shape, device=device, dtype=torch.float32)
        lse = torch.full(q.shape[:2], float("-inf"), device=device)
        after = q_rows >= first + length  # every key visible
        if bool(after.any()):
            o, l_ = _attend(q[after], k, v, query_start=0, causal=False)
            out[after], lse[after] = o.float(), l_
        inside = (q_rows >= first) & ~after  # the diagonal block: causal
        if bool(inside.any()):
            rows = q_rows[inside] - first
            # Contiguous by construction (a chunk's own queries).
            o, l_ = _attend(
                q[inside],
                k[: int(rows.max()) + 1],
                v[: int(rows.max()) + 1],
                query_start=int(rows.min()),
                causal=True,
            )
            out[inside], lse[inside] = o.float(), l_
        return out, lse

    def pass_q():
        gathered = [torch.empty_like(my_q_rows) for _ in range(world)]
        dist.all_gather(gathered, my_q_rows, group=group)
        rows_all = torch.cat(gathered)
        o, lse = partial(rows_all, my_k, my_v, my_pos)
        packed = torch.cat([o.flatten(1), lse], dim=1).contiguous()
        back = torch.empty_like(packed)
        dist.all_to_all_single(back, packed, group=group)
        back = back.view(world, my_q_rows.numel(), -1)
        outs = back[..., : hq * d].view(world, -1, hq, d)
        return merge_attention_states(outputs=outs, lses=back[..., hq * d :].contiguous())[0]

    def allgather_kv():
        ks = [torch.empty_like(my_k) for _ in range(world)]
        vs = [torch.empty_like(my_v) for _ in range(world)]
        ps = [torch.empty_like(my_pos) for _ in range(world)]
        dist.all_gather(ks, my_k, group=group)
        dist.all_gather(vs, my_v, group=group)
        dist.all_gather(ps, my_pos, group=group)
        return partial(my_q_rows, torch.cat(ks), torch.cat(vs), torch.cat(ps))[0]

    def ring():
        k, v, pos = my_k, my_v, my_pos
        outs, lses = [], []
        for step in range(world):
            if step < world - 1:
                nk, nv, npos = torch.empty_like(k), torch.empty_like(v), torch.empty_like(pos)
                ops = [dist.P2POp(dist.isend, t, (rank + 1) % world, group) for t in (k, v, pos)]
                ops += [dist.P2POp(dist.irecv, t, (rank - 1) % world, group)
                        for t in (nk, nv, npos)]  # fmt: skip
                requests = dist.batch_isend_irecv(ops)
            o, lse = partial(my_q_rows, k, v, pos)  # overlaps the transfer
            outs.append(o)
            lses.append(lse)
            if step < world - 1:
                for request in requests:
                    request.wait()
                k, v, pos = nk, nv, npos
        return merge_attention_states(outputs=torch.stack(outs), lses=torch.stack(lses))[0]

    results, outputs = {}, {}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, fn in (("pass_q", pass_q), ("ring", ring), ("allgather_kv", allgather_kv)):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        outputs[name] = fn()
        times = []
        for _ in range(repeats):
            dist.barrier(group)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        kv_bytes = 2 * my_k.numel() * my_k.element_size()
        moved = {"pass_q": 2 * round_tokens * hq * d * 2,  # queries in, partials back
                 "ring": (world - 1) * kv_bytes,
                 "allgather_kv": (world - 1) * kv_bytes}[name]  # fmt: skip
        results[name] = {"ms": round(statistics.median(times), 3),
                         "bytes_received_per_rank": moved,
                         "peak_extra_gib": None}  # fmt: skip
        if cuda:
            extra = torch.cuda.max_memory_allocated(device) - base
            results[name]["peak_extra_gib"] = round(extra / 2**30, 2)
    ref = outputs["allgather_kv"].float()
    for name in ("pass_q", "ring"):
        results[name]["max_abs_diff_vs_allgather"] = float(
            (outputs[name].float() - ref).abs().max()
        )
    if total <= 8192:  # small enough for one exact causal attention as the reference
        want, _ = _attend(queries, keys, values, query_start=past, causal=True)
        results["allgather_kv"]["max_abs_diff_vs_single_device"] = float(
            (want[my_q_rows].float() - ref).abs().max()
        )
    best = min(results, key=lambda n: results[n]["ms"])
    return {"past_tokens": past, "round_tokens": round_tokens, "world_size": world,
            "strategies": results, "fastest": best}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("engine", "strategies", "both"), default="both")
    parser.add_argument("--contexts", default="131072,262144")
    parser.add_argument("--pasts", default="131072,524288,1048576")
    parser.add_argument("--rounds", default="16384,65536")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="strategies only, gloo (smoke test)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    backend = "gloo" if args.cpu else "nccl"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=900))
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    if args.cpu:
        device, peak = torch.device("cpu"), float("nan")
        args.part = "strategies"
    else:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        peak = matmul_tflops(device)
    log(rank, f"world {world}, bf16 matmul {peak:.0f} TFLOP/s")
    report: dict = {
        "world_size": world,
        "matmul_tflops": round(peak, 1),
        "mfu_formula": "(2 * non_embedding_params * N + 4 * layers * N^2/2 * "
        "q_heads * head_dim) / (seconds * world * matmul rate)",
    }
    if args.part in ("strategies", "both") and world > 1:
        rows = []
        for past in [int(x) for x in args.pasts.split(",") if x]:
            for round_tokens in [int(x) for x in args.rounds.split(",") if x]:
                row = strategies_part(rank=rank, world=world, group=group, device=device,
                                      past=past, round_tokens=round_tokens,
                                      repeats=args.repeats)  # fmt: skip
                rows.append(row)
                log(rank, "strategies", row)
                gc.collect()
                torch.cuda.empty_cache()
        report["strategies"] = rows
    if args.part in ("engine", "both"):
        config = llama31_8b_config()
        model = random_model(config, dtype=torch.bfloat16, device=device, seed=0)
        contexts = [int(x) for x in args.contexts.split(",") if x]
        report["model"] = "Llama-3.1-8B shape, random bf16 weights"
        report["chunk_tokens_per_rank"] = CHUNK
        report["engine"] = engine_part(model, config, contexts=contexts, rank=rank, world=world,
                                       group=group, device=device, peak=peak)  # fmt: skip
    if rank == 0:
        from benchmarks.common import write_result

        print("wrote", write_result(f"prefill-w{world}", report, out_dir=args.out_dir))
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
