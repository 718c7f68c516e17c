"""Exact prefill: engine throughput and MFU; the context-parallel strategy chosen by measurement.

One process per GPU under torchrun (NCCL); ``--tiny`` runs the same code on the CPU (gloo,
fp32, small shapes) as a smoke test:

    torchrun --nproc-per-node 2 benchmarks/prefill.py --part 2
    torchrun --nproc-per-node 2 benchmarks/prefill.py --part 1 --contexts 1048576
    python benchmarks/prefill.py --merge run-a/prefill-*.json run-b/prefill-*.json

Rank 0 prints and writes ``<out-dir>/prefill-<device>-w<world>-<date>.json``; a file of that
name already there is merged into (rows of the same context or case are replaced), and
``--merge`` combines the files of separate runs offline.

Part 1 (``--part 1``): a Llama-3.1-8B-shaped model with random bf16 weights prefills a random
prompt of N tokens through the engine's own ``_prefill`` (``LLMEngine`` on one GPU, pass-Q
context-parallel rounds of ``world x --chunk`` tokens on several), after a warm-up prefill of
a short prompt, with the KV cache sized to the busiest rank's share of N + 1 tokens. MFU =
model FLOPs / (seconds x world_size x the bf16 matmul rate measured in this run, 8192^3, best
of 10); model FLOPs = 2 x (parameters without the input embedding and the LM head) x N +
causal attention 2 x 2 x num_layers x (N^2 / 2) x num_qo_heads x head_dim. The LM head runs
on one token in prefill; ``mfu_counting_lm_head`` counts it on all N (the training convention).

Part 2 (``--part 2``): one attention layer (32 query / 8 KV heads, head_dim 128) of one round:
every rank holds ``past / world`` earlier tokens' K/V and a zigzag pair of the round's chunks
(``round / (2 world)`` tokens each) and needs exact attention for its own queries. Strategies:
  - ``pass_q``: the engine's own ``ContextParallelAttention`` over a one-layer paged cache:
    all-gather the round's queries, attend to local keys, all-to-all the partial (out, lse)
    back, log-sum-exp merge;
  - ``ring``: world - 1 steps passing each rank's K/V block around the ring
    (``batch_isend_irecv``), attention to the block in hand overlapping the transfer,
    merged as it goes;
  - ``allgather_kv``: all-gather every rank's K/V, attend locally (whole context per rank).
All three are checked against each other on every rank, and against a single-device
reference (``kernels.ref.prefill_attention_ref``) on a small case.
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_slug, environment  # noqa: E402
from benchmarks.synthetic import llama31_8b_config, random_model  # noqa: E402
from longquest.engine.cache import CacheShape, KVCache, pages_for  # noqa: E402
from longquest.engine.config import ModelConfig, QuestConfig, SamplingParams  # noqa: E402
from longquest.engine.engine import LLMEngine  # noqa: E402
from longquest.kernels import merge_attention_states, prefill_attention  # noqa: E402
from longquest.kernels.ref import prefill_attention_ref  # noqa: E402
from longquest.parallel.comm import SequenceParallelComm  # noqa: E402
from longquest.parallel.ownership import PageOwnership  # noqa: E402
from longquest.parallel.prefill import ContextParallelAttention, RoundPlan  # noqa: E402
from longquest.parallel.worker import SequenceParallelRanks  # noqa: E402

PAGE = 16
STRATEGIES = ("pass_q", "ring", "allgather_kv")
TIE = 0.02  # strategies within 2% of the fastest count as tied (run-to-run noise)
MODEL_FLOPS = (
    "2 * P * N + 2 * 2 * num_layers * (N^2 / 2) * num_qo_heads * head_dim; P = parameters "
    "without the input embedding and the LM head (prefill computes one token's logits)"
)
# all_gather_single replaces the deprecated all_gather_into_tensor in newer torch.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
MFU = "model_flops / (seconds * world_size * peak), peak = mean per-GPU matmul rate"


def sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (CPU smoke numbers are tiny, GPU ones huge)."""
    return float(f"{value:.{digits}g}")


def log(rank: int, *parts: object) -> None:
    if rank == 0:
        print(*parts, flush=True)


def tiny_model_config() -> ModelConfig:
    """A small Llama for the CPU smoke test (head_dim 32, 4 query / 2 KV heads)."""
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128, intermediate_size=192,
        num_layers=2, num_qo_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=1 << 20, eos_token_ids=(0,),
    )  # fmt: skip


class Bench:
    """Where this rank runs and how it synchronises: device, group, timing helpers."""

    def __init__(
        self, *, device: torch.device, group: dist.ProcessGroup, rank: int, world: int
    ) -> None:
        self.device, self.group, self.rank, self.world = device, group, rank, world
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reduce(self, value: float, op=dist.ReduceOp.MAX) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return float(t)

    def gather(self, value: float) -> list[float]:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        out = torch.empty(self.world, dtype=torch.float64, device=self.device)
        all_gather(out, t, group=self.group)
        return out.tolist()

    def timed(self, fn: Callable[[], object], *, iters: int, budget_s: float) -> list[float]:
        """Milliseconds of up to ``iters`` synchronised calls (at least min(3, iters)), fewer
        when a call is slow: the first call's slowest-rank time sets the count on every rank,
        so collectives inside ``fn`` stay matched."""
        times: list[float] = []
        count = iters
        while len(times) < count:
            dist.barrier(group=self.group)
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
            if len(times) == 1:
                slowest = self.reduce(times[0])
                count = min(iters, max(3, int(budget_s * 1e3 / max(slowest, 1e-3))))
        return times

    def peak_extra(self, fn: Callable[[], object]) -> tuple[object, float | None]:
        """``fn()``'s result and the most memory (GiB) it held beyond what was allocated."""
        if not self.cuda:
            return fn(), None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        result = fn()
        self.sync()
        return result, (torch.cuda.max_memory_allocated(self.device) - base) / 2**30


def peak_matmul_tflops(bench: Bench) -> float:
    """Best rate of a square matmul (bf16 8192^3 on CUDA, CUDA events; fp32 256^3 on the CPU)."""
    size, dtype = (8192, torch.bfloat16) if bench.cuda else (256, torch.float32)
    a = torch.randn(size, size, device=bench.device, dtype=dtype)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        if bench.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


# --------------------------------------------------------------------------- part 1: engine


def model_flops(*, config: ModelConfig, model: torch.nn.Module, tokens: int) -> tuple[float, float]:
    """(FLOPs of a prefill of ``tokens`` as run, the same counting the LM head on every token)."""
    body = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith(("embed_tokens", "lm_head"))
    )
    head = config.vocab_size * config.hidden_size
    attention = (
        4 * config.num_layers * (tokens * tokens / 2) * config.num_qo_heads * config.head_dim
    )
    run = 2 * body * tokens + 2 * head + attention
    return run, run + 2 * head * (tokens - 1)


def kv_shape(
    *, layers: int, pages: int, heads: int, head_dim: int, dtype: torch.dtype
) -> CacheShape:
    """The paged cache's shape (page size ``PAGE``)."""
    return CacheShape(num_layers=layers, num_pages=pages, page_size=PAGE, num_kv_heads=heads,
                      head_dim=head_dim, dtype=dtype)  # fmt: skip


def cache_pages(*, tokens: int, chunk: int, world: int) -> int:
    """Pages the busiest rank holds for a prompt of ``tokens`` and one generated token."""
    total = pages_for(tokens + 1, PAGE)
    if world == 1:
        return total
    ownership = PageOwnership(world_size=world, page_size=PAGE, prefill_chunk_tokens=chunk)
    return max(ownership.num_local_pages(rank=r, num_pages=total) for r in range(world))


def make_engine(
    *, model: torch.nn.Module, config: ModelConfig, tokens: int, chunk: int, bench: Bench,
    dtype: torch.dtype,
) -> LLMEngine:  # fmt: skip
    """An engine whose cache holds ``tokens`` + 1 on every rank and not much more."""
    world, rank = bench.world, bench.rank
    pages = cache_pages(tokens=tokens, chunk=chunk, world=world)
    shape = kv_shape(layers=config.num_layers, pages=pages, heads=config.num_kv_heads,
                     head_dim=config.head_dim, dtype=dtype)  # fmt: skip
    common = dict(model=model, model_config=config, cache=KVCache(shape, device=bench.device),
                  quest=QuestConfig(token_budget=None), detokenize=lambda ids: "",
                  eos_token_ids=(), prefill_chunk_tokens=chunk)  # fmt: skip
    if world == 1:
        return LLMEngine(**common)
    comm = SequenceParallelComm(group=bench.group, rank=rank, world_size=world)
    ownership = PageOwnership(world_size=world, page_size=PAGE, prefill_chunk_tokens=chunk)
    ranks = SequenceParallelRanks(group=bench.group, ownership=ownership, world_size=world,
                                  rank=rank, comm=comm, device=bench.device)  # fmt: skip
    return LLMEngine(ranks=ranks, **common)


def fits(
    *, config: ModelConfig, tokens: int, chunk: int, bench: Bench, dtype: torch.dtype,
    reserve_gib: float,
) -> str:  # fmt: skip
    """Why a context cannot be prefilled here ('' if it can); every rank gets the same answer."""
    if not bench.cuda:
        return ""
    probe = kv_shape(layers=config.num_layers, pages=1, heads=config.num_kv_heads,
                     head_dim=config.head_dim, dtype=dtype)  # fmt: skip
    need = cache_pages(tokens=tokens, chunk=chunk, world=bench.world) * probe.bytes_per_page
    free = torch.cuda.mem_get_info(bench.device)[0] - reserve_gib * 2**30
    short = bench.reduce(need - free)  # the tightest rank decides for all
    if short > 0:
        return (
            f"KV cache needs {need / 2**30:.1f} GiB a rank; the tightest rank has "
            f"{(need - short) / 2**30:.1f} GiB free after a {reserve_gib:g} GiB reserve"
        )
    return ""


def progress_printer(*, rank: int, tokens: int, step: int) -> Callable[[str, int, int], None]:
    """An ``on_progress`` that prints at each quarter of the prompt (host-side: work queued)."""
    start, marks = time.perf_counter(), [tokens * k // 4 for k in range(1, 4)]

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "prefill" and any(done - step < m <= done for m in marks):
            log(rank, f"  prefill {tokens}: {done} queued, {time.perf_counter() - start:.0f} s")

    return progress


def engine_prefill(
    *, model: torch.nn.Module, config: ModelConfig, contexts: list[int], chunk: int,
    bench: Bench, dtype: torch.dtype, peak: float, reserve_gib: float,
) -> list[dict]:  # fmt: skip
    """Part 1: one timed prefill per context after a short warm-up; rows for the JSON."""
    rows = []
    for tokens in contexts:
        why = fits(config=config, tokens=tokens, chunk=chunk, bench=bench, dtype=dtype,
                   reserve_gib=reserve_gib)  # fmt: skip
        if why:
            rows.append({"context": tokens, "skipped": why})
            log(bench.rank, f"prefill {tokens}: skipped ({why})")
            continue
        engine = make_engine(model=model, config=config, tokens=tokens, chunk=chunk, bench=bench,
                             dtype=dtype)  # fmt: skip
        prompt = torch.randint(
            0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(tokens)
        ).tolist()
        params = [SamplingParams(max_tokens=1, ignore_eos=True)]
        engine.generate([prompt[: min(tokens, 2 * bench.world * chunk)]], params)  # warm-up
        bench.sync()
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats(bench.device)
        dist.barrier(group=bench.group)
        t0 = time.perf_counter()
        progress = progress_printer(rank=bench.rank, tokens=tokens, step=bench.world * chunk)
        (result,) = engine.generate([prompt], params, on_progress=progress)
        bench.sync()
        seconds = bench.reduce(time.perf_counter() - t0)
        flops, flops_head = model_flops(config=config, model=model, tokens=tokens)
        peak_gib = None
        if bench.cuda:
            peak_gib = round(bench.reduce(torch.cuda.max_memory_allocated(bench.device)) / 2**30, 2)
        shape, rate = engine.cache.shape, seconds * bench.world * peak * 1e12
        rows.append({
            "context": tokens, "seconds": round(seconds, 3),
            "engine_prefill_seconds": round(bench.reduce(result.prefill_seconds), 3),
            "tokens_per_second": round(tokens / seconds, 1), "model_tflop": sig(flops / 1e12),
            "mfu": round(flops / rate, 4), "mfu_counting_lm_head": round(flops_head / rate, 4),
            "cache_pages_per_rank": shape.num_pages,
            "cache_gib_per_rank": round(shape.num_pages * shape.bytes_per_page / 2**30, 2),
            "peak_memory_gib": peak_gib,
        })  # fmt: skip
        log(bench.rank, "prefill", json.dumps(rows[-1]))
        del engine, result
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ part 2: CP strategies


def attend(
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    start: int,
    causal: bool,
    kernel: Callable = prefill_attention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of queries ``q`` at positions ``start..`` over a packed K/V block
    ``kv`` ``[num_k, 2, num_kv_heads, head_dim]`` at positions ``0..num_k - 1``."""
    return kernel(query=q, key=kv[:, 0], value=kv[:, 1], query_start=start, causal=causal)


class RoundLayer:
    """One layer of one prefill round on this rank, and the three ways to attend it.

    my_kv: ``[past_local + 2 * chunk, 2, num_kv_heads, head_dim]`` — this rank's K (``[:, 0]``)
    and V (``[:, 1]``): its past tokens, then its round chunks ``rank`` and ``2 * world - 1 -
    rank`` (each ``chunk = round / (2 * world)`` tokens). my_q: ``[2 * chunk, num_qo_heads,
    head_dim]``, the queries of those two chunks. The round starts at position ``past``.
    """

    def __init__(
        self, *, bench: Bench, past: int, round_tokens: int, heads: tuple[int, int, int],
        dtype: torch.dtype, seed: int = 0,
    ) -> None:  # fmt: skip
        world, rank = bench.world, bench.rank
        if round_tokens % (2 * world * PAGE) or past % (world * PAGE):
            raise ValueError(
                f"round ({round_tokens}) must be a multiple of 2 * world * {PAGE} "
                f"and past ({past}) of world * {PAGE}; pick sizes that divide"
            )
        self.bench, self.past, self.round = bench, past, round_tokens
        self.hq, self.hkv, self.d = heads
        self.chunk = c = round_tokens // (2 * world)
        self.past_local = p = past // world
        self.mine = (rank, 2 * world - 1 - rank)  # my chunks' indices in the round
        gen = torch.Generator(device=bench.device).manual_seed(seed * 7919 + rank)
        dev = bench.device
        self.my_kv = torch.randn(
            p + 2 * c, 2, self.hkv, self.d, device=dev, dtype=dtype, generator=gen
        )
        self.my_q = torch.randn(2 * c, self.hq, self.d, device=dev, dtype=dtype, generator=gen)
        self._build_engine_side()

    # (a) pass-Q: the engine's ContextParallelAttention, driven standalone --------------
    def _build_engine_side(self) -> None:
        world, c, p, dev = self.bench.world, self.chunk, self.past_local, self.bench.device
        shape = kv_shape(layers=1, pages=(p + 2 * c) // PAGE, heads=self.hkv, head_dim=self.d,
                         dtype=self.my_kv.dtype)  # fmt: skip
        self.cache = KVCache(shape, device=dev)
        paged = self.my_kv.view(-1, PAGE, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        self.cache.k[0].copy_(paged[0])
        self.cache.v[0].copy_(paged[1])
        order, send_rows = [0] * self.round, []
        for r in range(world):
            rows = [q for k in (r, 2 * world - 1 - r) for q in range(k * c, (k + 1) * c)]
            send_rows.append(rows)
            for i, q in enumerate(rows):
                order[q] = r * 2 * c + i
        pages = torch.arange(shape.num_pages, dtype=torch.int32, device=dev)
        first = p // PAGE
        segments = tuple(
            (self.past + k * c, self.past + (k + 1) * c,
             pages[first + i * c // PAGE : first + (i + 1) * c // PAGE])
            for i, k in enumerate(self.mine)
        )  # fmt: skip
        self.plan = RoundPlan(
            round_start=self.past, round_end=self.past + self.round, num_local=2 * c,
            max_tokens=2 * c, order=torch.tensor(order, device=dev),
            send_rows=torch.tensor(send_rows, device=dev),
            send_valid=torch.ones(world, 2 * c, dtype=torch.bool, device=dev),
            slot_mapping=None, append_plan=None,  # the cache already holds the round's K/V
            past_pages=pages[:first], segments=segments,
        )  # fmt: skip

    def pass_q(self) -> torch.Tensor:
        attention = ContextParallelAttention(
            cache=self.cache, plan=self.plan, group=self.bench.group, world_size=self.bench.world
        )
        kv = self.my_kv[self.past_local :]
        return attention(layer=0, query=self.my_q, key=kv[:, 0], value=kv[:, 1])

    # (b) ring pass-KV ------------------------------------------------------------------
    def ring(self) -> torch.Tensor:
        world, rank = self.bench.world, self.bench.rank
        out = torch.zeros(self.my_q.shape, dtype=torch.float32, device=self.bench.device)
        lse = torch.full(self.my_q.shape[:2], -torch.inf, device=self.bench.device)
        block = self.my_kv
        for step in range(world):
            if step < world - 1:  # the next block travels while this one is attended
                incoming, requests = self._pass_on(block)
            self._attend_block(block, (rank - step) % world, out, lse)
            if step < world - 1:
                for request in requests:
                    request.wait()
                block = incoming
        return out.to(self.my_q.dtype)

    def _pass_on(self, block: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Start sending ``block`` to the next rank and receiving the previous rank's."""
        world, rank, group = self.bench.world, self.bench.rank, self.bench.group
        incoming = torch.empty_like(block)
        ops = [dist.P2POp(dist.isend, block, (rank + 1) % world, group),
               dist.P2POp(dist.irecv, incoming, (rank - 1) % world, group)]  # fmt: skip
        return incoming, dist.batch_isend_irecv(ops)

    def _attend_block(
        self, block: torch.Tensor, source: int, out: torch.Tensor, lse: torch.Tensor
    ) -> None:
        """Merge my queries' attention to ``source``'s K/V block into (out, lse) fp32."""
        c, p, world = self.chunk, self.past_local, self.bench.world
        parts = [(0, attend(self.my_q, block[:p], start=0, causal=False))]
        for i, k in enumerate((source, 2 * world - 1 - source)):
            # My queries at or after key chunk k: both my chunks, the later one, or none.
            first = 0 if k <= self.mine[0] else c if k <= self.mine[1] else 2 * c
            if first < 2 * c:
                # On the diagonal, causal from 0 is exact: rows past the chunk see all of it.
                kv = block[p + i * c : p + (i + 1) * c]
                parts.append((first, attend(self.my_q[first:], kv, start=0, causal=k in self.mine)))
        for first, (o, s) in parts:
            merged = merge_attention_states(outputs=torch.stack((out[first:], o.float())),
                                            lses=torch.stack((lse[first:], s)))  # fmt: skip
            out[first:], lse[first:] = merged

    # (c) all-gather K/V ----------------------------------------------------------------
    def gather_context(self) -> torch.Tensor:
        """Every rank's K/V in position order: ``[past + round, 2, num_kv_heads, head_dim]``."""
        world, c, p, tail = self.bench.world, self.chunk, self.past_local, self.my_kv.shape[1:]
        full = self.my_kv.new_empty(self.past + self.round, *tail)
        all_gather(full[: self.past], self.my_kv[:p], group=self.bench.group)
        # gloo wants the gathered tensor shaped [world * rows, ...]; reshape afterwards.
        chunks = self.my_kv.new_empty(world * 2 * c, *tail)
        all_gather(chunks, self.my_kv[p:], group=self.bench.group)
        chunks = chunks.view(world, 2, c, *tail)
        round_kv = full[self.past :].view(2 * world, c, *tail)
        round_kv[:world].copy_(chunks[:, 0])  # chunk r is rank r's first
        round_kv[world:].copy_(chunks.flip(0)[:, 1])  # chunk 2w-1-r is rank r's second
        return full

    def allgather_kv(self, *, kernel: Callable = prefill_attention) -> torch.Tensor:
        full, c = self.gather_context(), self.chunk
        outs = []
        for i, k in enumerate(self.mine):
            start = self.past + k * c
            q = self.my_q[i * c : (i + 1) * c]
            outs.append(attend(q, full[: start + c], start=start, causal=True, kernel=kernel)[0])
        return torch.cat(outs)

    def reference(self) -> torch.Tensor:
        """Single-device attention of my queries: the fp32 dense reference, whole context."""
        return self.allgather_kv(kernel=prefill_attention_ref)

    # communication alone, with the same buffers ------------------------------------------
    def comm_only(self, name: str) -> Callable[[], object]:
        """The strategy's communication alone, on buffers of the same sizes."""
        if name == "allgather_kv":
            return self.gather_context
        if name == "ring":

            def transfers() -> None:
                block = self.my_kv
                for _ in range(self.bench.world - 1):
                    incoming, requests = self._pass_on(block)
                    for request in requests:
                        request.wait()
                    block = incoming

            return transfers
        world, group = self.bench.world, self.bench.group
        queries = self.my_q.new_empty(world * 2 * self.chunk, self.hq, self.d)
        partial = self.my_q.new_zeros(world, 2 * self.chunk, self.hq, self.d + 1).float()
        received = torch.empty_like(partial)
        return lambda: (all_gather(queries, self.my_q, group=group),
                        dist.all_to_all_single(received, partial, group=group))  # fmt: skip

    def bytes_received(self, name: str) -> int:
        """Bytes one rank receives per layer (and sends: the patterns are symmetric)."""
        world, elt = self.bench.world, self.my_kv.element_size()
        if name == "pass_q":  # bf16 queries in, fp32 (out, lse) partials back
            width = 2 * self.chunk
            return (world - 1) * width * self.hq * (self.d * elt + (self.d + 1) * 4)
        return (world - 1) * self.my_kv.numel() * elt

    def attention_flops(self) -> float:
        """Useful FLOPs of the layer's attention, all ranks together (causal round)."""
        keys = self.round * self.past + self.round * self.round / 2
        return 4 * keys * self.hq * self.d


def compare_strategies(
    *, bench: Bench, past: int, round_tokens: int, heads: tuple[int, int, int],
    dtype: torch.dtype, args: argparse.Namespace, time_it: bool = True,
) -> dict:  # fmt: skip
    """Part 2, one case: each strategy's time, traffic, memory and agreement, for the JSON."""
    layer = RoundLayer(bench=bench, past=past, round_tokens=round_tokens, heads=heads, dtype=dtype)
    flops = layer.attention_flops()
    case = {"past_tokens": past, "round_tokens": round_tokens,
            "past_tokens_per_rank": layer.past_local, "round_tokens_per_rank": 2 * layer.chunk,
            "attention_tflop": sig(flops / 1e12), "strategies": {}}  # fmt: skip
    outputs = {}
    for name in STRATEGIES:
        fn = getattr(layer, name)
        outputs[name], extra = bench.peak_extra(fn)  # also the first warm-up call
        row = case["strategies"][name] = {
            "bytes_received_per_rank": layer.bytes_received(name),
            "peak_extra_gib": None if extra is None else round(extra, 3),
        }
        if not time_it:
            continue
        for _ in range(args.warmup - 1):
            fn()
        times = bench.timed(fn, iters=args.iters, budget_s=args.budget_s)
        per_rank = bench.gather(statistics.median(times))
        comm = bench.timed(layer.comm_only(name), iters=args.iters, budget_s=args.budget_s)
        row.update(ms=round(max(per_rank), 3), ms_per_rank=[round(t, 3) for t in per_rank],
                   comm_ms=round(bench.reduce(statistics.median(comm)), 3), calls=len(times),
                   tflops_per_gpu=sig(flops / max(per_rank) / bench.world / 1e9))  # fmt: skip
    for name in STRATEGIES:
        diff = (outputs[name].float() - outputs["allgather_kv"].float()).abs().max()
        case["strategies"][name]["max_abs_diff_vs_allgather_kv"] = bench.reduce(diff)
    if past + round_tokens <= args.reference_max_tokens:
        want = layer.reference().float()
        case["max_abs_diff_vs_single_device"] = {
            name: bench.reduce((outputs[name].float() - want).abs().max()) for name in STRATEGIES
        }
    if time_it:
        case["fastest"] = min(STRATEGIES, key=lambda n: case["strategies"][n]["ms"])
    del layer, outputs
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()
    return case


def choose(cases: list[dict], *, world: int) -> dict:
    """Which strategy wins where, from the measured cases (ties within TIE go to less traffic)."""
    if world == 1:
        return {"strategy": None, "summary": "one rank: nothing to communicate, no choice"}
    by_case, wins = [], dict.fromkeys(STRATEGIES, 0)
    for case in cases:
        ms = {n: case["strategies"][n]["ms"] for n in STRATEGIES}
        ranked = sorted(ms, key=ms.get)
        tied = [n for n in ranked if ms[n] <= ms[ranked[0]] * (1 + TIE)]
        chosen = min(tied, key=lambda n: case["strategies"][n]["bytes_received_per_rank"])
        wins[chosen] += 1
        runner_up = round(100 * (ms[ranked[1]] / ms[ranked[0]] - 1), 2)
        by_case.append({"past_tokens": case["past_tokens"], "round_tokens": case["round_tokens"],
                        "fastest": ranked[0], "within_tie": tied, "chosen": chosen,
                        "runner_up_slower_pct": runner_up})  # fmt: skip
    strategy = max(STRATEGIES, key=lambda n: (wins[n], n == "pass_q"))
    summary = (f"{strategy}: chosen in {wins[strategy]} of {len(cases)} cases at world {world} "
               f"(fastest, or within {TIE:.0%} of the fastest and moving the fewest bytes); "
               "allgather_kv also holds the whole context on every rank, so it cannot serve a "
               "context larger than one GPU")  # fmt: skip
    return {"strategy": strategy, "wins": wins, "tie": TIE, "summary": summary, "by_case": by_case}


# --------------------------------------------------------------------------------- output


def merge_reports(old: dict, new: dict) -> dict:
    """``new`` over ``old``: part 1 rows by context, part 2 cases by (past, round)."""
    merged = {**old, **new, "runs": old.get("runs", []) + new.get("runs", [])}
    keys = {
        "engine": ("rows", lambda r: r["context"]),
        "strategies": ("cases", lambda c: (c["past_tokens"], c["round_tokens"])),
    }
    for part, (rows, key) in keys.items():
        if part in old or part in new:
            by_key: dict = {}
            for row in old.get(part, {}).get(rows, []) + new.get(part, {}).get(rows, []):
                if not ("skipped" in row and "skipped" not in by_key.get(key(row), row)):
                    by_key[key(row)] = row  # the newer, unless it skipped what was measured
            merged[part] = {**old.get(part, {}), **new.get(part, {}),
                            rows: [by_key[k] for k in sorted(by_key)]}  # fmt: skip
    if "strategies" in merged:
        merged["choice"] = choose(merged["strategies"]["cases"], world=merged["world_size"])
    return merged


def write_report(report: dict, *, out_dir: str | Path) -> Path:
    """Write (or merge into) ``<out_dir>/prefill-<device>-w<world>-<date>.json``."""
    env = report["environment"]
    name = f"prefill-{device_slug(env['device'])}-w{report['world_size']}-{env['date'][:10]}.json"
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        report = merge_reports(json.loads(path.read_text()), report)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def sizes(text: str, name: str) -> list[int]:
    """``"131072,262144"`` -> ``[131072, 262144]``; ValueError naming the option otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} must list positive token counts, got {text!r}")
    return values


def check_sizes(args: argparse.Namespace, *, world: int) -> None:
    """Refuse sizes that cannot be split over ``world`` ranks before any work starts."""
    if world > 1 and args.chunk % (2 * PAGE):
        raise ValueError(f"--chunk must be a multiple of {2 * PAGE} with several ranks, "
                         f"got {args.chunk}")  # fmt: skip
    if args.part == "1":
        return
    for r in args.rounds:
        if r % (2 * world * PAGE):
            raise ValueError(f"--rounds: {r} is not a multiple of 2 * world * {PAGE} = "
                             f"{2 * world * PAGE} (two whole-page chunks a rank)")  # fmt: skip
    for p in args.pasts:
        if p % (world * PAGE):
            raise ValueError(f"--pasts: {p} is not a multiple of world * {PAGE} = {world * PAGE}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--part", choices=("1", "2", "both"), default="both")
    add("--contexts", help="part 1 prompt tokens (default 131072,...,1048576; --tiny 256,512)")
    add("--chunk", type=int, help="part 1 prefill tokens a rank a round (8192; --tiny 64)")
    add("--pasts", help="part 2 context so far, all ranks (131072,524288,1048576; --tiny 128)")
    add("--rounds", help="part 2 round tokens, all ranks (16384,65536; --tiny 64)")
    add("--warmup", type=int, default=3, help="part 2 untimed calls a strategy (>= 1)")
    add("--iters", type=int, default=10, help="part 2 timed calls a strategy, at most")
    add("--budget-s", type=float, default=5.0, help="part 2: fewer calls (>= 3) past this")
    add("--reference-max-tokens", type=int, default=8192, help="part 2: check against one device")
    add("--reserve-gib", type=float, default=8.0, help="part 1: GPU memory kept from the cache")
    add("--tiny", action="store_true", help="CPU, gloo, fp32, tiny shapes (smoke test)")
    add("--out-dir", default="benchmarks/results")
    add("--merge", nargs="+", metavar="JSON", help="merge result files into --out-dir, exit")
    args = parser.parse_args(argv)
    tiny = args.tiny
    default = "256,512" if tiny else "131072,262144,524288,1048576"
    args.contexts = sizes(args.contexts or default, "contexts")
    args.pasts = sizes(args.pasts or ("128" if tiny else "131072,524288,1048576"), "pasts")
    args.rounds = sizes(args.rounds or ("64" if tiny else "16384,65536"), "rounds")
    args.chunk = args.chunk or (64 if tiny else 8192)
    if args.warmup < 1 or args.iters < 1 or args.chunk < 1:
        raise ValueError("--warmup, --iters and --chunk must be >= 1")
    return args


def merge_files(paths: list[str], *, out_dir: str | Path) -> Path:
    """Combine result files of separate runs (same device and world size) into one."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    if len({r["world_size"] for r in reports}) != 1:
        raise ValueError("--merge: the files have different world sizes; merge each separately")
    merged = reports[0]
    for report in reports[1:]:
        merged = merge_reports(merged, report)
    path = Path(out_dir) / Path(paths[0]).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return path


def start(args: argparse.Namespace) -> Bench:
    """This rank's device and process group (a group of one without torchrun)."""
    on_cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_cuda else None
    if on_cuda:
        torch.cuda.set_device(device)
    options = dict(backend="nccl" if on_cuda else "gloo", timeout=datetime.timedelta(hours=1))
    if on_cuda:
        options["device_id"] = device
    if "RANK" not in os.environ:
        options.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(**options)
    return Bench(device=device or torch.device("cpu"), group=dist.group.WORLD,
                 rank=dist.get_rank(), world=dist.get_world_size())  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        print("wrote", merge_files(args.merge, out_dir=args.out_dir))
        return 0
    bench = start(args)
    world, rank, device = bench.world, bench.rank, bench.device
    check_sizes(args, world=world)
    dtype = torch.bfloat16 if bench.cuda else torch.float32
    peaks = bench.gather(peak_matmul_tflops(bench))
    log(rank, f"world {world}, {dtype}, matmul {[sig(p) for p in peaks]} TFLOP/s a GPU")
    env = environment()
    report: dict = {
        "name": "prefill", "device": env["device"], "world_size": world, "dtype": str(dtype),
        "tiny": args.tiny, "environment": env, "matmul_tflops_per_gpu": [sig(p) for p in peaks],
        "runs": [{"date": env["date"], "git_commit": env["git_commit"],
                  "git_dirty": env["git_dirty"], "argv": sys.argv[1:]}],
    }  # fmt: skip
    if args.part in ("2", "both"):
        heads = (4, 2, 32) if args.tiny else (32, 8, 128)
        kw = dict(bench=bench, heads=heads, dtype=dtype, args=args)
        check = None
        if min(args.pasts) + min(args.rounds) > args.reference_max_tokens:
            # The timed cases are too long for the dense reference: check a small case too.
            check = compare_strategies(past=4096, round_tokens=2048, time_it=False, **kw)
            log(rank, "reference check", json.dumps(check))
        cases = []
        for past in args.pasts:
            for round_tokens in args.rounds:
                cases.append(compare_strategies(past=past, round_tokens=round_tokens, **kw))
                found = cases[-1]["strategies"].items()
                log(rank, f"past {past} round {round_tokens}: " + ", ".join(
                    f"{n} {s['ms']} ms ({s['comm_ms']} comm)" for n, s in found))  # fmt: skip
        report["strategies"] = {
            "shapes": dict(zip(("num_qo_heads", "num_kv_heads", "head_dim"), heads)),
            "warmup": args.warmup, "iters_at_most": args.iters, "reference_check": check,
            "ms": "median call on each rank, the slowest rank's (one layer); comm_ms: the "
                  "communication alone; bytes: received by one rank for one layer; peak_extra_gib: "
                  "allocator memory beyond the inputs in one call (NCCL's buffers not counted)",
            "cases": cases,
        }  # fmt: skip
        report["choice"] = choose(cases, world=world)
        log(rank, "choice:", report["choice"]["summary"])
    if args.part in ("1", "both"):
        config = tiny_model_config() if args.tiny else llama31_8b_config()
        model = random_model(config, dtype=dtype, device=device, seed=0)
        peak = statistics.mean(peaks)
        rows = engine_prefill(model=model, config=config, contexts=args.contexts, chunk=args.chunk,
                              bench=bench, dtype=dtype, peak=peak,
                              reserve_gib=args.reserve_gib)  # fmt: skip
        report["engine"] = {
            "model": ("tiny" if args.tiny else "Llama-3.1-8B shape") + ", random weights",
            "config": {k: v for k, v in vars(config).items() if isinstance(v, int)},
            "chunk_tokens_per_rank": args.chunk, "round_tokens": world * args.chunk,
            "model_flops": MODEL_FLOPS, "mfu": MFU, "peak_tflops_per_gpu": sig(peak),
            "rows": rows,
        }  # fmt: skip
    if rank == 0:
        print("wrote", write_report(report, out_dir=args.out_dir), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
