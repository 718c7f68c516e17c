"""Decode speed at long contexts: Quest against dense, per world size, with the floor.

Run one process per GPU (NCCL); ``--nproc-per-node 1`` is the single-GPU engine:

    torchrun --nproc-per-node 2 benchmarks/decode.py --contexts 131072,524288,1048576

The model is Llama-3.1-8B-shaped with random bf16 weights (decode speed does not
depend on weight values). Each sequence's KV cache is filled synthetically
(:func:`benchmarks.synthetic.fill_synthetic`: seeded random keys and values
per page, exact Quest bounds) instead of a prefill. For every (context, batch) that
fits, the same engine decodes the same sequences in each mode:

- ``quest-B``: Quest at a token budget B (first two layers dense); ``quest-B/gG`` (or
  ``quest-B/gGmM``): the same with two-level selection over groups of G pages, kept groups
  holding M page budgets (``--group-pages``, e.g. ``none,4,8:4`` with ``--page-size 4``:
  one level and two levels side by side; M defaults to ``--group-margin``);
- ``dense``: the same engine attending to every page (under sequence parallelism:
  the dense sequence-parallel baseline, "decode context parallelism");
- ``sdpa`` (one GPU): the same model with torch SDPA over contiguous K/V (one K/V
  buffer shared by all layers: the time does not depend on the values).

Times are per output token as a user sees them: an engine launch (a CUDA graph of
``steps_per_launch`` greedy steps, tokens picked and broadcast on the device, plus
the host's bookkeeping) divided by the tokens it made; median of ``--steps``
launches after ``--warmup`` launches.
The breakdown replays each component alone in a CUDA graph at the row's shapes. Every
mode reports ``metadata_bytes``: the Quest bounds one step reads on this rank (one level:
every page's; two levels: every group's coarse bounds plus the kept groups' pages').
``--rows 524288x1,65536x8`` replaces the contexts x batches grid.
The floor of a row is (weight bytes + Quest metadata bytes + KV bytes read) per
rank / the copy bandwidth measured in this run, plus the collectives per step x
the latency of one all-gather measured in this run inside a graph of
``COLLECTIVE_CHAIN`` back to back (``collective_latency_chained``: one all-gather
replayed alone would also count a graph launch and make that term loose).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import (  # noqa: E402
    decode_steps,
    fill_synthetic,
    llama31_8b_config,
    random_model,
)
from longquest.engine.builder import resolve_bounds_dtype  # noqa: E402
from longquest.engine.cache import CacheCapacityError, CacheShape, KVCache  # noqa: E402
from longquest.engine.config import ModelConfig, QuestConfig, SamplingParams  # noqa: E402
from longquest.engine.engine import LLMEngine  # noqa: E402
from longquest.kernels import (  # noqa: E402
    page_scores,
    paged_decode_attention,
    select_pages,
    select_pages_two_level,
)
from longquest.parallel.comm import SequenceParallelComm  # noqa: E402
from longquest.parallel.ownership import PageOwnership  # noqa: E402
from longquest.parallel.peer import PeerCollectives  # noqa: E402
from longquest.parallel.worker import SequenceParallelRanks  # noqa: E402

PAGE = 16  # the default; --page-size changes it


def log(rank: int, *parts) -> None:
    if rank == 0:
        print(*parts, flush=True)


def tiny_config() -> ModelConfig:
    """A small Llama for the CPU smoke test."""
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=96,
        num_layers=3, num_qo_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=1 << 20,
        eos_token_ids=(0,),
    )  # fmt: skip


COLLECTIVE_CHAIN = 16  # merges captured back to back to time one collective in a graph


def timed_ms(fn, *, device: torch.device, group, iters: int = 20) -> float:
    """Median ms of ``fn``: a CUDA graph of one call replayed ``iters`` times (every
    rank replays the same number: collectives inside stay matched); wall clock on CPU."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from benchmarks.common import capture_graph

    graph = capture_graph(fn, warmups=2)
    if group is not None:
        dist.barrier(group)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]  # fmt: skip
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in events)


class SdpaAttention:
    """Dense attention with torch SDPA over one contiguous K/V shared by every layer."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value  # [num_seqs, num_kv_heads, tokens, head_dim]

    def __call__(self, *, layer, query, key, value):
        out = F.scaled_dot_product_attention(
            query[:, :, None], self.key, self.value, enable_gqa=True
        )
        return out[:, :, 0]


def make_engine(model, config, *, num_pages, page_size, device, dtype, group, rank, world,
                split_mlp=True, bounds_dtype=None, peer=None):  # fmt: skip
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=num_pages,
        page_size=page_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
        bounds_dtype=bounds_dtype,
    )
    dense = QuestConfig(token_budget=None, page_size=page_size)
    common = dict(model=model, model_config=config, cache=KVCache(shape, device=device),
                  quest=dense, detokenize=lambda ids: "", eos_token_ids=(),
                  prefill_chunk_tokens=8192)  # fmt: skip
    if world == 1:
        return LLMEngine(**common)
    ownership = PageOwnership(world_size=world, page_size=page_size, prefill_chunk_tokens=8192)
    comm = SequenceParallelComm(group=group, rank=rank, world_size=world, peer=peer)
    ranks = SequenceParallelRanks(group=group, ownership=ownership, world_size=world, rank=rank,
                                  comm=comm, device=device, split_mlp=split_mlp)  # fmt: skip
    return LLMEngine(ranks=ranks, **common)


def breakdown(engine, *, quest: QuestConfig, group, iters: int) -> dict:
    """ms per decode step of each component, replayed alone at this batch's shapes."""
    config, device, cache = engine.config, engine.device, engine.cache
    batch = engine.decode_batch
    rows = len(batch.request_ids)
    dtype = cache.shape.dtype
    world = engine.world_size
    ids = batch.first_tokens()
    positions, meta = batch.inputs(step=0, sparse=True)
    query = torch.randn(rows, config.num_qo_heads, config.head_dim, device=device, dtype=dtype)
    layer = config.num_layers - 1
    k_cache, v_cache, key_min, key_max = cache.layer(layer)
    budget = quest.page_budget
    dense_layers = config.num_layers if budget is None else min(quest.dense_layers,
                                                                 config.num_layers)  # fmt: skip
    sparse_layers = config.num_layers - dense_layers
    result: dict = {}

    def identity(*, layer, query, key, value):
        return query

    def weights():
        hidden = engine.model(
            input_ids=ids, positions=positions, attention=identity, mlp_split=engine.mlp_split
        )
        return engine.model.compute_logits(hidden)

    with torch.inference_mode():
        result["weights_and_mlp"] = timed_ms(weights, device=device, group=group, iters=iters)
        # As the engine runs it: the splits reduced through the batch's counters.
        counters = meta.split_counters
        dense_ms = timed_ms(
            lambda: paged_decode_attention(query=query, k_cache=k_cache, v_cache=v_cache,
                                           page_table=meta.page_table, seq_lens=meta.seq_lens,
                                           check_pages=False, split_counters=counters),
            device=device, group=group, iters=iters,
        )  # fmt: skip
        result["dense_attention"] = dense_ms * dense_layers
        gather_ms = 0.0
        if world > 1:
            # As the engine sends it: the partial state already in the gathered layout.
            out, lse = engine.comm.partial_buffers(
                num_seqs=rows, num_qo_heads=config.num_qo_heads, head_dim=config.head_dim,
                device=device,
            )  # fmt: skip
            out.copy_(query), lse.zero_()
            gather_ms = timed_ms(lambda: engine.comm.merge(out=out, lse=lse, dtype=dtype),
                                 device=device, group=group, iters=iters)  # fmt: skip
            result["collective_merge"] = gather_ms * config.num_layers
            # One merge replayed alone also times a graph launch; a step's collectives run
            # back to back inside one graph, so the floor takes the latency from a chain.
            chain_ms = timed_ms(
                lambda: [engine.comm.merge(out=out, lse=lse, dtype=dtype)
                         for _ in range(COLLECTIVE_CHAIN)],
                device=device, group=group, iters=iters,
            )  # fmt: skip
            result["collective_latency_chained"] = chain_ms / COLLECTIVE_CHAIN
        if sparse_layers:
            select, result["scores"], result["top_k"] = _selection(
                quest, query, key_min, key_max, meta, layer, group=group, iters=iters
            )
            top_scores, local = select()
            result["scores"] *= sparse_layers
            result["top_k"] *= sparse_layers
            selected = engine.comm.select_global(
                top_scores=top_scores,
                local_indices=local,
                global_pages=meta.global_pages,
                top_k=budget,
            )
            if world > 1:
                result["collective_top_k"] = sparse_layers * timed_ms(
                    lambda: engine.comm.select_global(
                        top_scores=top_scores, local_indices=local,
                        global_pages=meta.global_pages, top_k=budget),
                    device=device, group=group, iters=iters,
                )  # fmt: skip
            result["sparse_attention"] = sparse_layers * timed_ms(
                lambda: paged_decode_attention(query=query, k_cache=k_cache, v_cache=v_cache,
                                               page_table=meta.page_table,
                                               seq_lens=meta.seq_lens, selected=selected,
                                               check_pages=False, split_counters=counters),
                device=device, group=group, iters=iters,
            )  # fmt: skip
            result["selected_pages_this_rank"] = int((selected >= 0).sum())
    result["all_gather_latency"] = gather_ms
    result.setdefault("collective_latency_chained", 0.0)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


def _selection(quest, query, key_min, key_max, meta, layer, *, group, iters):
    """``(select, scores_ms, top_k_ms)`` of one sparse layer as the engine runs it (through
    the batch's workspace, spread where allowed). Two levels: ``scores_ms`` is the coarse
    scan, ``top_k_ms`` everything else (coarse top-k, fine scores, fine top-k)."""
    device, budget = query.device, quest.page_budget
    work, spread = meta.select_workspace, quest.spread_selection
    fine = dict(query=query, key_min=key_min, key_max=key_max, page_table=meta.page_table,
                num_pages=meta.num_pages)  # fmt: skip
    coarse = meta.coarse
    if quest.group_pages is None:

        def scan():
            return page_scores(**fine, check_pages=False)

        scores = scan()

        def select():
            return select_pages(scores=scores, num_pages=meta.num_pages, top_k=budget,
                                pin_last=meta.pin_last, workspace=work, spread=spread)  # fmt: skip

        scan_ms = timed_ms(scan, device=device, group=group, iters=iters)
        return select, scan_ms, timed_ms(select, device=device, group=group, iters=iters)

    def scan():
        return page_scores(query=query, key_min=coarse.key_min[layer],
                           key_max=coarse.key_max[layer], page_table=coarse.table,
                           num_pages=coarse.num_groups, pin_from=coarse.pin_from,
                           check_pages=False)  # fmt: skip

    def select():
        return select_pages_two_level(
            **fine, pin_last=meta.pin_last, coarse_min=coarse.key_min[layer],
            coarse_max=coarse.key_max[layer], coarse_table=coarse.table,
            num_groups=coarse.num_groups, pin_from=coarse.pin_from,
            group_pages=quest.group_pages,
            kept_groups=min(quest.kept_groups, coarse.table.shape[1]), top_k=budget,
            workspace=work, spread=spread,
        )  # fmt: skip

    scan_ms = timed_ms(scan, device=device, group=group, iters=iters)
    total_ms = timed_ms(select, device=device, group=group, iters=iters)
    return select, scan_ms, max(0.0, total_ms - scan_ms)


def metadata_bytes(engine, *, seqs, quest: QuestConfig) -> int:
    """Quest bounds one decode step reads on this rank, over every sparse layer."""
    config, shape = engine.config, engine.cache.shape
    budget = quest.page_budget
    if budget is None:
        return 0
    sparse = config.num_layers - min(quest.dense_layers, config.num_layers)
    # min and max of a page (or group), every KV head, at the bounds' own width
    bound = 2 * config.num_kv_heads * config.head_dim * shape.key_bounds_dtype.itemsize
    pages = [len(s.local_pages) for s in seqs]
    group = quest.group_pages
    if group is None:
        return sparse * sum(pages) * bound
    groups = [-(-n // group) for n in pages]
    kept = [min(quest.kept_groups, g) * group for g in groups]  # fine pages scored a head
    # + the per-step refresh of each row's last full group, every layer
    return (sparse * (sum(groups) + sum(kept)) + config.num_layers * len(seqs) * group) * bound


def floor_ms(engine, *, seqs, quest: QuestConfig, copy_gbps: float, gather_ms: float) -> dict:
    """The row's floor: bytes this rank must read / copy bandwidth + collective latency."""
    config, shape = engine.config, engine.cache.shape
    world = engine.world_size
    model = engine.model
    rows = len(seqs)
    element = shape.dtype.itemsize
    embed = config.vocab_size * config.hidden_size
    params = sum(p.numel() for p in model.parameters())
    # The embedding table is read one row per sequence; every other weight in full,
    # but for the MLPs' other ranks' shares when decode splits them.
    read = params - embed + rows * config.hidden_size
    mlp_collectives = 0
    if engine.mlp_split is not None:
        mlp = config.num_layers * 3 * config.intermediate_size * config.hidden_size
        read -= mlp - mlp // world
        mlp_collectives = config.num_layers
    weight_bytes = read * element
    page_kv = (
        2 * shape.page_size * config.num_kv_heads * config.head_dim * element
    )  # K and V of a page
    local_pages = sum(len(s.local_pages) for s in seqs)
    budget = quest.page_budget
    if budget is None:
        kv_bytes = config.num_layers * local_pages * page_kv
        meta_bytes = 0
        collectives = config.num_layers
    else:
        dense = min(quest.dense_layers, config.num_layers)
        sparse = config.num_layers - dense
        meta_bytes = metadata_bytes(engine, seqs=seqs, quest=quest)
        # Each rank attends to its share of the global top-k: budget / world on average.
        selected = sparse * rows * math.ceil(budget / world) * page_kv
        kv_bytes = dense * local_pages * page_kv + selected
        collectives = dense + 2 * sparse
    collectives += mlp_collectives
    total = weight_bytes + meta_bytes + kv_bytes
    comm_ms = (collectives + 1) * gather_ms if world > 1 else 0.0
    return {
        "weight_bytes": weight_bytes, "metadata_bytes": meta_bytes, "kv_bytes": kv_bytes,
        "collectives_per_step": collectives + 1 if world > 1 else 0,
        "floor_ms": round(total / (copy_gbps * 1e9) * 1e3 + comm_ms, 4),
    }  # fmt: skip


def replay_ms(engine, *, iters: int) -> tuple[float | None, float | None]:
    """Device time of the step's captured graph alone, and the host time of one
    ``graph.replay()`` call (the launch). The rest of a step is host work: sampling,
    bookkeeping. Replays rewrite the same slot with the same values: the cache stays."""
    batch = engine.decode_batch
    graphs = batch.graphs() if batch is not None else {}
    if not graphs:
        return None, None
    key = max(graphs)  # (sparse, greedy, steps): the sparse graph if there is one
    graph = graphs[key]
    steps = key[2]
    group = engine_group(engine)
    torch.cuda.synchronize()
    if group is not None:
        dist.barrier(group)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]  # fmt: skip
    launches = []
    for start, end in events:
        start.record()
        began = time.perf_counter()
        graph.replay()
        launches.append((time.perf_counter() - began) * 1e3 / steps)
        end.record()
    torch.cuda.synchronize()
    device_ms = statistics.median(s.elapsed_time(e) for s, e in events) / steps
    return round(device_ms, 4), round(statistics.median(launches), 4)


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("collective", ("nccl", "_exchange_kernel")),
    ("scores", ("_page_scores_kernel", "_group_page_scores_kernel")),
    ("two_level_other", ("_candidate_pages_kernel", "_refresh_kernel")),
    ("top_k", ("_select_kernel",)),  # the spread selection's name ends alike
    ("global_top_k", ("pack", "keep", "global")),
    ("attention", ("_decode_kernel", "_merge_kernel")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("norm_rope_act", ("rms", "rotate", "silu", "rope")),
    ("append", ("append",)),
)


def profile_step(engine, *, replays: int = 5) -> dict | None:
    """Kernels of the step's captured graph, by kind, from the CUDA profiler (rank 0's
    view; every rank replays alike): device time a step per kind, and the step's span
    against its kernels' busy time (the rest is gaps between kernels)."""
    batch = engine.decode_batch
    graphs = batch.graphs() if batch is not None else {}
    if not graphs or engine.device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    key = max(graphs)
    graph = graphs[key]
    steps = key[2] * replays
    group = engine_group(engine)
    torch.cuda.synchronize()
    if group is not None:
        dist.barrier(group)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return None
    kinds: dict[str, float] = {}
    names: dict[str, list] = {}
    busy, reach = 0.0, spans[0][0]
    for start, end, name in spans:
        lower = name.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(x in lower for x in subs)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + (end - start)
        entry = names.setdefault(name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += end - start
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = spans[-1][1] - spans[0][0]
    top = sorted(names.items(), key=lambda item: -item[1][1])[:12]
    return {
        "ms_per_step_by_kind": {k: round(v / steps / 1e3, 4) for k, v in sorted(kinds.items())},
        "kernels_per_step": round(len(spans) / steps, 1),
        "span_ms_per_step": round(span / steps / 1e3, 4),
        "busy_ms_per_step": round(busy / steps / 1e3, 4),
        "top_kernels": [
            {"name": n, "per_step": round(c / steps, 1), "ms_per_step": round(t / steps / 1e3, 4)}
            for n, (c, t) in top
        ],  # fmt: skip
    }


def sdpa_ms(engine, *, batch: int, context: int, iters: int) -> float | None:
    """Per-token ms of the same model with SDPA over contiguous K/V, or None if it won't fit."""
    config, device = engine.config, engine.device
    need = 2 * batch * context * config.num_kv_heads * config.head_dim * 2
    if device.type == "cuda" and need > torch.cuda.mem_get_info(device)[0] - 2 * 2**30:
        return None
    kv = (batch, config.num_kv_heads, context, config.head_dim)
    key = torch.randn(kv, device=device, dtype=engine.cache.shape.dtype)
    value = torch.randn_like(key)
    attention = SdpaAttention(key, value)
    ids = torch.ones(batch, dtype=torch.long, device=device)
    positions = torch.full((batch,), context, dtype=torch.long, device=device)

    def step():
        hidden = engine.model(input_ids=ids, positions=positions, attention=attention)
        return engine.model.compute_logits(hidden)

    with torch.inference_mode():
        ms = timed_ms(step, device=device, group=None, iters=iters)
    del key, value
    return ms


def run_row(engine, *, context, batch, budgets, args, copy_gbps, group, rank) -> dict | None:
    world = engine.world_size
    page = engine.page_size
    kinds = args.collectives_list if world > 1 else ["nccl"]
    selections = args.selection_list
    modes = []
    for kind in kinds:
        suffix = f"@{kind}" if len(kinds) > 1 else ""
        for selection, (group, margin, tag) in [(s, g) for s in selections
                                                for g in args.group_list]:  # fmt: skip
            label = f"/{selection}" if len(selections) > 1 else ""
            label += "" if group is None else f"/g{tag}"
            # The local top-k spread over programs where select_pages chooses it, or never.
            spread = selection == "spread"
            modes += [(f"quest-{b}{label}{suffix}",
                       QuestConfig(token_budget=b, page_size=page, spread_selection=spread,
                                   group_pages=group, group_margin=margin),
                       kind, selection) for b in budgets]  # fmt: skip
        modes.append(
            (f"dense{suffix}", QuestConfig(token_budget=None, page_size=page), kind, "spread")
        )
    per_mode = (args.warmup + args.steps) * engine.steps_per_launch
    # + one more warmup of the first mode
    params = SamplingParams(
        max_tokens=len(modes) * per_mode + args.warmup * engine.steps_per_launch + 4,
        ignore_eos=True,
    )
    seqs = []
    row: dict = {"context": context, "batch": batch, "world_size": world}
    try:
        for i in range(batch):
            seqs.append(fill_synthetic(engine, context_tokens=context, seed=i, request_id=i,
                                       params=params))  # fmt: skip
    except (CacheCapacityError, ValueError) as error:
        for seq in seqs:
            engine.release(seq)
        row["skipped"] = f"does not fit: {str(error)[:200]}"
        log(rank, json.dumps(row))
        return row
    row["local_pages_rank0"] = sum(len(s.local_pages) for s in seqs)
    # Every rank finishes its fill before any mode is timed (a rank still filling would
    # stall the others' collectives inside the first timed launches).
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    if engine_group(engine) is not None:
        dist.barrier(engine_group(engine))
    # The fill's Python objects (page lists of millions of tokens) would otherwise be
    # walked by garbage collections that stall one rank, and with it every other rank, in
    # the timed launches; the first mode also warms up twice as long.
    gc.collect()
    gc.freeze()
    results = {}
    peer = getattr(engine.comm, "peer", None) if world > 1 else None
    for index, (name, quest, kind, selection) in enumerate(modes):
        engine.quest = quest
        engine.drop_decode_batch()
        if world > 1:  # the comm is also the MLP split's: both switch together
            engine.comm.peer = peer if kind == "peer" else None
        warmup = args.warmup * (2 if index == 0 else 1)
        times = decode_steps(engine, seqs, launches=warmup + args.steps)[warmup:]
        entry = {"ms_per_token": round(1e3 * statistics.median(times), 4),
                 "ms_per_token_min": round(1e3 * min(times), 4)}  # fmt: skip
        entry["graph_replay_ms"], entry["graph_launch_host_ms"] = replay_ms(
            engine, iters=args.iters
        )
        if args.profile:
            entry["profile"] = profile_step(engine)
            log(rank, f"  {name} profile: {json.dumps(entry['profile'])}")
        entry["breakdown_ms"] = breakdown(engine, quest=quest, group=engine_group(engine),
                                          iters=args.iters)  # fmt: skip
        entry["floor"] = floor_ms(
            engine,
            seqs=seqs,
            quest=quest,
            copy_gbps=copy_gbps,
            gather_ms=entry["breakdown_ms"]["collective_latency_chained"],
        )
        entry["vs_floor"] = round(entry["ms_per_token"] / entry["floor"]["floor_ms"], 2)
        entry["metadata_bytes"] = entry["floor"]["metadata_bytes"]
        entry["group_pages"], entry["group_margin"] = quest.group_pages, quest.group_margin
        entry["collectives"] = kind if world > 1 else None
        entry["selection"] = selection
        results[name] = entry
        log(rank, f"  {context=} {batch=} {world=} {name}: {entry['ms_per_token']} ms/token "
                  f"(metadata {entry['metadata_bytes'] / 1e6:.4g} MB/step, "
                  f"floor {entry['floor']['floor_ms']}, x{entry['vs_floor']}, "
                  f"graph {entry['graph_replay_ms']}, launch {entry['graph_launch_host_ms']}) "
                  f"{json.dumps(entry['breakdown_ms'])}")  # fmt: skip
    engine.drop_decode_batch()
    if world == 1 and not args.no_sdpa:
        ms = sdpa_ms(engine, batch=batch, context=context, iters=args.iters)
        results["sdpa"] = {"ms_per_token": None if ms is None else round(ms, 4)}
        log(rank, f"  sdpa: {ms}")
    gc.unfreeze()
    for seq in seqs:
        engine.release(seq)
    if world > 1:
        engine.comm.peer = peer
    row["modes"] = results
    row["quest_speedup_vs_dense"] = {}
    for name, entry in results.items():  # against dense with the same collectives
        if name.startswith("quest"):
            _, at, kind = name.partition("@")
            dense = results[f"dense{at}{kind}"]["ms_per_token"]
            row["quest_speedup_vs_dense"][name] = round(dense / entry["ms_per_token"], 2)
    return row


def parse_group(text: str, margin: float) -> tuple[int | None, float, str]:
    """``"none"``, ``"G"`` or ``"G:M"`` -> ``(group_pages, group_margin, name tag)``."""
    if text == "none":
        return None, margin, ""
    group, _, given = text.partition(":")
    margin = float(given) if given else margin
    return int(group), margin, group + (f"m{margin:g}" if given else "")


def engine_group(engine):
    return getattr(engine.ranks, "group", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="131072,524288,1048576")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budgets", default="2048,4096")
    parser.add_argument("--steps", type=int, default=6, help="timed launches per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed launches per mode")
    parser.add_argument("--iters", type=int, default=20, help="replays per breakdown component")
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=8.0,
        help="GPU memory left outside the KV cache (graphs, SDPA, workspace)",
    )
    parser.add_argument("--page-size", type=int, default=PAGE, help="tokens a KV page")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument(
        "--no-split-mlp", action="store_true", help="every rank reads the whole MLP in decode"
    )
    parser.add_argument("--label", default="", help="appended to the result file's name")
    parser.add_argument(
        "--profile", action="store_true", help="kernels of the captured step, by kind (CUDA)"
    )
    parser.add_argument(
        "--bounds-dtype", choices=["model", "float8_e4m3fn"], default="model",
        help="dtype of the Quest key bounds",
    )  # fmt: skip
    parser.add_argument(
        "--collectives", default="peer",
        help="comma list of how decode's collectives run under sequence parallelism: peer "
        "(Triton over peer memory, NCCL where it is not possible) and/or nccl; each is timed",
    )  # fmt: skip
    parser.add_argument(
        "--selection", default="spread",
        help="comma list of how Quest's local top-k runs: spread (a long row over several "
        "programs in one launch, where chosen) and/or two-pass (never spread); each is timed",
    )  # fmt: skip
    parser.add_argument(
        "--group-pages", default="none",
        help="comma list of none (one-level selection) and/or G or G:M: two-level selection "
        "over groups of G pages, kept groups holding M page budgets; each is timed",
    )  # fmt: skip
    parser.add_argument("--group-margin", type=float, default=2.0,
                        help="M of the two-level modes that give none")  # fmt: skip
    parser.add_argument("--rows", default="",
                        help="CONTEXTxBATCH comma list instead of contexts x batches")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (smoke test)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    args.collectives_list = [k for k in args.collectives.split(",") if k]
    if not args.collectives_list or set(args.collectives_list) - {"peer", "nccl"}:
        parser.error(f"--collectives takes peer and/or nccl, got {args.collectives!r}")
    args.selection_list = [k for k in args.selection.split(",") if k]
    if not args.selection_list or set(args.selection_list) - {"spread", "two-pass"}:
        parser.error(f"--selection takes spread and/or two-pass, got {args.selection!r}")
    args.group_list = [parse_group(g, args.group_margin) for g in args.group_pages.split(",") if g]
    on_cuda = torch.cuda.is_available() and not args.tiny
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if on_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=900))  # fmt: skip
        rank, world = dist.get_rank(), dist.get_world_size()
        group = dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    if on_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    config = tiny_config() if args.tiny else llama31_8b_config()
    model = random_model(config, dtype=dtype, device=device, seed=0)
    if on_cuda:
        from benchmarks.common import measure_copy_bandwidth

        copy_gbps = measure_copy_bandwidth(device)
        torch.cuda.empty_cache()  # the copy's buffers: give them to the KV pool
        free = torch.cuda.mem_get_info(device)[0] - int(args.reserve_gib * 2**30)
    else:
        copy_gbps, free = 10.0, 256 * 2**20
    page = args.page_size
    page_bytes = 2 * page * config.num_kv_heads * config.head_dim * dtype.itemsize
    bounds_dtype = resolve_bounds_dtype(None if args.bounds_dtype == "model" else args.bounds_dtype)
    page_bytes += 2 * config.num_kv_heads * config.head_dim * (bounds_dtype or dtype).itemsize
    num_pages = free // (page_bytes * config.num_layers)
    if group is not None:  # every rank plans with the smallest pool
        pool = torch.tensor([num_pages], device=device)
        dist.all_reduce(pool, op=dist.ReduceOp.MIN, group=group)
        num_pages = int(pool)
    peer = None
    if group is not None and "peer" in args.collectives_list:
        peer = PeerCollectives.create(group=group, rank=rank, world_size=world, device=device)
        log(rank, f"peer collectives: {'on' if peer is not None else 'not possible here: NCCL'}")
    engine = make_engine(model, config, num_pages=num_pages, page_size=page, device=device,
                         dtype=dtype, group=group, rank=rank, world=world,
                         split_mlp=not args.no_split_mlp, bounds_dtype=bounds_dtype,
                         peer=peer)  # fmt: skip
    log(rank, f"world {world}, {num_pages} pages/rank ({num_pages * page} tokens), "
              f"copy {copy_gbps:.0f} GB/s")  # fmt: skip
    budgets = [int(b) for b in args.budgets.split(",") if b]
    rows = []
    grid = [(int(c), int(b)) for c in args.contexts.split(",") if c
            for b in args.batches.split(",") if b]  # fmt: skip
    if args.rows:
        grid = [tuple(int(x) for x in item.split("x")) for item in args.rows.split(",") if item]
    for context, batch in grid:
        row = run_row(engine, context=context, batch=batch, budgets=budgets, args=args,
                      copy_gbps=copy_gbps, group=group, rank=rank)  # fmt: skip
        rows.append(row)
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    report = {
        "model": "tiny" if args.tiny else "Llama-3.1-8B shape, random weights",
        "dtype": str(dtype), "world_size": world, "page_size": page,
        "pool_pages_per_rank": num_pages, "copy_bandwidth_gbps": round(copy_gbps, 1),
        "cuda_graphs": engine.cuda_graphs, "steps": args.steps, "warmup": args.warmup,
        "mlp_split_over_ranks": engine.mlp_split is not None,
        "peer_collectives_possible": peer is not None,
        "bounds_dtype": str(engine.cache.shape.key_bounds_dtype),
        "fill": "synthetic (benchmarks.synthetic.fill_synthetic)", "rows": rows,
    }  # fmt: skip
    if rank == 0:
        from benchmarks.common import write_result

        name = f"decode-w{world}" + (f"-page{page}" if page != PAGE else "")
        groups = [tag for g, _, tag in args.group_list if g is not None]
        name += "-groups" + "_".join(groups) if groups else ""
        name += f"-{args.label}" if args.label else ""
        path = write_result(name, report, out_dir=args.out_dir)
        print("wrote", path, flush=True)
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
