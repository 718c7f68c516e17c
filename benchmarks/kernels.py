"""Kernel benchmark: one Llama-3.1-8B attention layer's Quest decode step on one GPU.

For every (batch, context) it times, eager and CUDA-graph-captured: the append of
one decode token per sequence, page scoring, page selection, attention over the
selected pages, the merge of two partial states (as sequence parallelism does),
the Quest step (scores + select + attention, *without* the merge) through the three
public launchers in a row (``quest_step``, the speedup's numerator), and the Quest total
(step + merge), beside dense decode by torch SDPA on contiguous K/V and by the engine's own
paged kernel (``selected=None``). Pages are a random permutation
of the pool, as an allocator leaves them. A correctness check against SDPA runs
first; a wrong kernel stops the run before any timing.

    python benchmarks/kernels.py                 # GPU: the full grid, a few minutes
    python benchmarks/kernels.py --smoke         # CPU, tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import itertools
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `longquest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    bench,
    bench_graph,
    bench_host,
    measure_copy_bandwidth,
    print_table,
    write_result,
)
from longquest.kernels import (  # noqa: E402
    append_kv,
    merge_attention_states,
    page_scores,
    paged_decode_attention,
    plan_append,
    select_pages,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerShape:
    """One attention layer's head layout and the cache's page size."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


LLAMA_8B = LayerShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)
SMOKE = LayerShape(num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
OPS = (
    "append",
    "scores",
    "select",
    "attend",
    "merge",
    "quest_step",
    "dense_paged",
    "sdpa",
)
HEADROOM = 3 * 2**30  # do_bench's 256 MiB flush buffer, graph pools, scores, allocator slack
TOLERANCE = 2e-2  # max |error| relative to max |reference|, bf16 inputs and outputs


def launcher_options(fn: Callable) -> dict:
    """``check_pages=False`` where the launcher accepts it: its validation syncs the host."""
    return {"check_pages": False} if "check_pages" in inspect.signature(fn).parameters else {}


def random_pool(shape: LayerShape, num_pages: int, device: torch.device) -> dict:
    """K/V pages of random keys and values, with each page's key bounds."""
    size = (num_pages, shape.num_kv_heads, shape.page_size, shape.head_dim)
    k_cache = torch.randn(size, dtype=shape.dtype, device=device)
    v_cache = torch.randn(size, dtype=shape.dtype, device=device)
    # Every page is full here; torch reductions, since append_kv over 1M tokens is too slow.
    return {
        "k_cache": k_cache,
        "v_cache": v_cache,
        "key_min": k_cache.amin(dim=2),
        "key_max": k_cache.amax(dim=2),
    }


def _fused_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, no math backend: it repeats K/V per query head, 4x the memory at 1M tokens."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN is left out too: its GQA support has had silent-error bugs; FlashAttention-2 is
    # the baseline people expect from "torch SDPA".
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense decode: query ``[batch, num_qo_heads, 1, head_dim]``, K/V ``[batch, kv, ctx, hd]``."""
    with _fused_backends(query.device):
        return F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)


def sdpa_backend(query: torch.Tensor, keys: torch.Tensor) -> str | None:
    """Which SDPA backend torch picks for these shapes (a private API: best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        with _fused_backends(query.device):
            choice = torch._fused_sdp_choice(query, keys, keys, enable_gqa=True)
        return SDPBackend(choice).name
    except Exception:  # noqa: BLE001 - only a label in the JSON
        return None


def check_correctness(*, shape: LayerShape, device: torch.device, impl: str | None) -> dict:
    """The Quest step with a budget covering the context must equal dense attention.

    Also: the merge of two disjoint halves equals the whole, scores and a sparse
    selection match the PyTorch implementation, and the newest page is pinned.
    """
    batch, num_pages = 2, (128 if device.type == "cuda" else 12)
    context = num_pages * shape.page_size - 5  # a partial last page exercises the mask
    pool = random_pool(shape, batch * num_pages + 7, device)
    filled = context - (num_pages - 1) * shape.page_size
    table = torch.randperm(batch * num_pages + 7, device=device)[: batch * num_pages]
    table = table.view(batch, num_pages).int()
    last = table[:, -1].long()
    pool["key_min"][last] = pool["k_cache"][last, :, :filled].amin(dim=2)
    pool["key_max"][last] = pool["k_cache"][last, :, :filled].amax(dim=2)
    # Scaled queries make attention peaked, so a wrong or missing page shows.
    query = 3 * torch.randn(batch, shape.num_qo_heads, shape.head_dim, device=device)
    query = query.to(shape.dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    pages = torch.full((batch,), num_pages, dtype=torch.int32, device=device)

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [batch, kv, context, head_dim]
        gathered = cache[table.long()].permute(0, 2, 1, 3, 4)
        gathered = gathered.reshape(batch, shape.num_kv_heads, -1, shape.head_dim)
        return gathered[:, :, :context].contiguous()

    keys, values = contiguous(pool["k_cache"]), contiguous(pool["v_cache"])
    sdpa_out = sdpa(query[:, :, None], keys, values)[:, :, 0].float()
    # An fp32 reference too, so a wrong SDPA backend is not blamed on the kernels.
    group = shape.num_qo_heads // shape.num_kv_heads
    keys32 = keys.float().repeat_interleave(group, 1)  # [batch, num_qo_heads, context, head_dim]
    logits = torch.einsum("bhd,bhtd->bht", query.float(), keys32) * shape.head_dim**-0.5
    ref_lse = torch.logsumexp(logits, dim=-1)
    values32 = values.float().repeat_interleave(group, 1)
    ref_out = torch.einsum("bht,bhtd->bhd", torch.softmax(logits, dim=-1), values32)

    common = {"key_min": pool["key_min"], "key_max": pool["key_max"], "page_table": table}
    scores = page_scores(query=query, num_pages=pages, impl=impl, **common)
    _, selected = select_pages(scores=scores, num_pages=pages, top_k=num_pages, impl=impl)
    attend = {"query": query, "k_cache": pool["k_cache"], "v_cache": pool["v_cache"]}
    attend.update(page_table=table, seq_lens=lens, impl=impl)
    out, lse = paged_decode_attention(selected=selected, **attend)
    half = num_pages // 2
    none = torch.full_like(selected[..., :half], -1)
    first = torch.cat([selected[..., :half], none, none[..., : num_pages - 2 * half]], -1)
    second = torch.cat([selected[..., half:], none], -1)
    parts = [paged_decode_attention(selected=sel, **attend) for sel in (first, second)]
    merged, merged_lse = merge_attention_states(
        outputs=torch.stack([p[0] for p in parts]),
        lses=torch.stack([p[1] for p in parts]),
        impl=impl,
    )
    scores_torch = page_scores(query=query, num_pages=pages, impl="torch", **common)
    sparse_k = max(1, num_pages // 4)
    sparse = select_pages(scores=scores, num_pages=pages, top_k=sparse_k, impl=impl)[1]
    sparse_torch = select_pages(scores=scores, num_pages=pages, top_k=sparse_k, impl="torch")[1]

    scale = ref_out.abs().max().item()

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.float() - b.float()).abs().max().item()

    report = {
        "batch": batch,
        "context": context,
        "sdpa_backend": sdpa_backend(query[:, :, None], keys),
        "reference_out_max_abs": scale,
        "step_out_max_err_vs_sdpa": err(out, sdpa_out),
        "step_out_max_err": err(out, ref_out),
        "step_lse_max_err": err(lse, ref_lse),
        "merged_out_max_err": err(merged, ref_out),
        "merged_lse_max_err": err(merged_lse, ref_lse),
        "sdpa_out_max_err": err(sdpa_out, ref_out),
        "scores_rel_err_vs_torch": err(scores, scores_torch) / scores_torch.abs().max().item(),
        "sparse_selection_matches_torch": torch.equal(sparse, sparse_torch),
        "newest_page_pinned": bool((sparse == num_pages - 1).any(-1).all()),
    }
    limits = {
        "step_out_max_err_vs_sdpa": TOLERANCE * scale,
        "step_out_max_err": TOLERANCE * scale,
        "merged_out_max_err": TOLERANCE * scale,
        "step_lse_max_err": TOLERANCE,
        "merged_lse_max_err": TOLERANCE,
        "scores_rel_err_vs_torch": 1e-3,
    }
    failures = [name for name, limit in limits.items() if not report[name] <= limit]
    flags = ("sparse_selection_matches_torch", "newest_page_pinned")
    failures += [name for name in flags if not report[name]]
    report["failures"] = failures
    report["passed"] = not failures
    return report


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def input_sets(*, working_set: int, bytes_each: int, device: torch.device, limit: int) -> int:
    """How many independent input sets to rotate among so that nothing is timed from L2.

    Enough that the sets' working sets add up to 4x L2 (at most ``limit``), fewer
    if memory is short; 0 if one set does not fit. The CPU gets one.
    """
    free = _free_bytes(device)
    if free is None:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    wanted = min(limit, max(1, math.ceil(4 * l2 / working_set)))
    return int(min(wanted, (free - HEADROOM) // bytes_each))


def time_op(
    per_set: list[Callable[[], object]], *, device: torch.device, graphs: bool, timing: dict
) -> tuple:
    """``(eager_ms, graph_ms, graph_error)`` of one call, rotating among the input sets.

    Eager: each timed call uses the next set. Graph: one graph runs every set in
    turn; its replay time is divided by the number of sets.
    """
    sets = itertools.cycle(per_set)
    eager = bench(lambda: next(sets)(), device=device, **timing)
    if not graphs:
        return eager, None, None
    try:
        replay = bench_graph(lambda: [fn() for fn in per_set], **timing)
    except Exception as exc:  # noqa: BLE001 - a capture failure is reported, not fatal
        torch.cuda.synchronize()
        return eager, None, f"{type(exc).__name__}: {exc}"[:400]
    return eager, replay / len(per_set), None


def run_quest(
    *,
    shape: LayerShape,
    batch: int,
    context: int,
    top_k: int,
    device: torch.device,
    impl: str | None,
    graphs: bool,
    timing: dict,
    host_calls: int,
) -> dict:
    """Time every Quest kernel (and dense paged attention) for one (batch, context)."""
    num_pages = context // shape.page_size
    elt = shape.element_size
    bounds_bytes = batch * num_pages * 2 * shape.num_kv_heads * shape.head_dim * elt
    query_bytes = batch * shape.num_qo_heads * shape.head_dim * elt
    selected_bytes = 2 * batch * min(top_k, num_pages) * shape.num_kv_heads * shape.page_size
    selected_bytes *= shape.head_dim * elt
    pool_bytes = batch * num_pages * 2 * shape.num_kv_heads * (shape.page_size + 1)
    pool_bytes *= shape.head_dim * elt
    row: dict = {"batch": batch, "context": context, "pages_per_seq": num_pages, "top_k": top_k}
    sets = input_sets(
        working_set=bounds_bytes + selected_bytes, bytes_each=pool_bytes, device=device, limit=16
    )
    if sets < 1:
        free = _free_bytes(device) or 0
        row["skipped"] = (
            f"page pool needs {pool_bytes / 2**30:.1f} GiB (+{HEADROOM / 2**30:.0f} GiB headroom), "
            f"{free / 2**30:.1f} GiB free"
        )
        return row
    total_pages = sets * batch * num_pages
    pool = random_pool(shape, total_pages, device)
    order = torch.randperm(total_pages, device=device).int().view(sets, batch, num_pages)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    page_counts = torch.full((batch,), num_pages, dtype=torch.int32, device=device)
    queries = torch.randn(sets, batch, shape.num_qo_heads, shape.head_dim, device=device)
    queries = queries.to(shape.dtype)
    new_kv = torch.randn(sets, 2, batch, shape.num_kv_heads, shape.head_dim, device=device)
    new_kv = new_kv.to(shape.dtype)
    # The decode token is the context's last one: the last slot of each sequence's last page.
    slots = order[:, :, -1].long() * shape.page_size + (context - 1) % shape.page_size
    plans = [plan_append(slot_mapping=slots[i], page_size=shape.page_size) for i in range(sets)]
    score_opts, attend_opts = (
        launcher_options(page_scores),
        launcher_options(paged_decode_attention),
    )
    append_opts = launcher_options(append_kv)

    def append(i: int) -> None:
        append_kv(
            key=new_kv[i, 0],
            value=new_kv[i, 1],
            slot_mapping=slots[i],
            plan=plans[i],
            impl=impl,
            **pool,
            **append_opts,
        )

    def scores(i: int) -> torch.Tensor:
        return page_scores(
            query=queries[i],
            key_min=pool["key_min"],
            key_max=pool["key_max"],
            page_table=order[i],
            num_pages=page_counts,
            impl=impl,
            **score_opts,
        )

    def select(score: torch.Tensor) -> torch.Tensor:
        return select_pages(
            scores=score, num_pages=page_counts, top_k=top_k, pin_last=True, impl=impl
        )[1]

    def attend(i: int, selected: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return paged_decode_attention(
            query=queries[i],
            k_cache=pool["k_cache"],
            v_cache=pool["v_cache"],
            page_table=order[i],
            seq_lens=seq_lens,
            selected=selected,
            impl=impl,
            **attend_opts,
        )

    all_scores = [scores(i) for i in range(sets)]
    selections = [select(s) for s in all_scores]
    # Two partial states over disjoint halves of the selection, as two ranks would send.
    half = (top_k + 1) // 2
    merge_inputs = []
    for i, sel in enumerate(selections):
        none = torch.full_like(sel, -1)
        first = torch.cat([sel[..., :half], none[..., half:]], -1)
        second = torch.cat([sel[..., half:], none[..., :half]], -1)
        parts = [attend(i, first), attend(i, second)]
        merge_inputs.append(
            (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        )

    def step(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return attend(i, select(scores(i)))

    per_op: dict[str, list[Callable[[], object]]] = {
        "append": [lambda i=i: append(i) for i in range(sets)],
        "scores": [lambda i=i: scores(i) for i in range(sets)],
        "select": [lambda s=s: select(s) for s in all_scores],
        "attend": [lambda i=i, s=s: attend(i, s) for i, s in enumerate(selections)],
        "merge": [
            lambda o=o, m=m: merge_attention_states(outputs=o, lses=m, impl=impl)
            for o, m in merge_inputs
        ],
        "quest_step": [lambda i=i: step(i) for i in range(sets)],
        "dense_paged": [lambda i=i: attend(i, None) for i in range(sets)],
    }
    row.update(sets=sets, eager_ms={}, graph_ms={}, graph_errors={}, host_ms={})
    row["eager_ms"]["plan_append"] = bench(
        lambda: plan_append(slot_mapping=slots[0], page_size=shape.page_size),
        device=device,
        **timing,
    )
    for name, fns in per_op.items():
        eager, graph, error = time_op(fns, device=device, graphs=graphs, timing=timing)
        row["eager_ms"][name], row["graph_ms"][name] = eager, graph
        if error:
            row["graph_errors"][name] = error
    cycle = itertools.cycle(per_op["quest_step"])
    row["host_ms"]["quest_step"] = bench_host(
        lambda: next(cycle)(), calls=host_calls, device=device
    )
    out, lse = step(0)
    row["finite"] = bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
    row["score_bytes"] = bounds_bytes + query_bytes
    row["shapes"] = {
        "k_cache": list(pool["k_cache"].shape),
        "key_min": list(pool["key_min"].shape),
        "page_table": list(order[0].shape),
        "query": list(queries[0].shape),
        "selected": list(selections[0].shape),
        "merge_outputs": list(merge_inputs[0][0].shape),
    }
    return row


def run_sdpa(
    *,
    shape: LayerShape,
    batch: int,
    context: int,
    device: torch.device,
    graphs: bool,
    timing: dict,
) -> dict:
    """Time dense decode by torch SDPA on contiguous ``[batch, kv, context, head_dim]`` K/V."""
    kv_bytes = 2 * batch * shape.num_kv_heads * context * shape.head_dim * shape.element_size
    sets = input_sets(working_set=kv_bytes, bytes_each=kv_bytes, device=device, limit=8)
    if sets < 1:
        return {"skipped": f"contiguous K/V need {kv_bytes / 2**30:.1f} GiB"}
    size = (sets, batch, shape.num_kv_heads, context, shape.head_dim)
    keys = torch.randn(size, dtype=shape.dtype, device=device)
    values = torch.randn(size, dtype=shape.dtype, device=device)
    query = torch.randn(sets, batch, shape.num_qo_heads, 1, shape.head_dim, device=device)
    query = query.to(shape.dtype)
    fns = [lambda i=i: sdpa(query[i], keys[i], values[i]) for i in range(sets)]
    eager, graph, error = time_op(fns, device=device, graphs=graphs, timing=timing)
    return {
        "sets": sets,
        "eager_ms": eager,
        "graph_ms": graph,
        "graph_error": error,
        "backend": sdpa_backend(query[0], keys[0]),
        "query_shape": list(query.shape[1:]),
        "kv_shape": list(size[1:]),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not numerator or not denominator else numerator / denominator


def derive(row: dict, copy_gbps: float) -> None:
    """Totals, speedups over SDPA, and the score kernel's achieved bandwidth."""
    for mode in ("eager", "graph"):
        times = row[f"{mode}_ms"]
        times["sdpa"] = row["sdpa"].get(f"{mode}_ms")
        step, merge = times.get("quest_step"), times.get("merge")
        # quest_total: the step plus the merge, summed from their separate medians.
        times["quest_total"] = None if step is None or merge is None else step + merge
        gbps = _ratio(row["score_bytes"] / 1e6, times.get("scores"))  # bytes/ms/1e6 = GB/s
        row[f"derived_{mode}"] = {
            "speedup_vs_sdpa": _ratio(times["sdpa"], step),
            "speedup_vs_dense_paged": _ratio(times.get("dense_paged"), step),
            "score_gbps": gbps,
            "score_fraction_of_copy": _ratio(gbps, copy_gbps),
        }


def table_rows(rows: list[dict], mode: str) -> list[dict]:
    out = []
    for row in rows:
        line = {"batch": row["batch"], "context": row["context"], "sets": row.get("sets")}
        if "skipped" in row:
            out.append({**line, "note": "skipped: " + row["skipped"]})
            continue
        line.update({op: row[f"{mode}_ms"].get(op) for op in OPS + ("quest_total",)})
        derived = row[f"derived_{mode}"]
        line["speedup"] = derived["speedup_vs_sdpa"]
        line["score_GB/s"] = derived["score_gbps"]
        fraction = derived["score_fraction_of_copy"]
        line["score_%copy"] = None if fraction is None else 100 * fraction
        if "skipped" in row["sdpa"]:
            line["note"] = "sdpa skipped: " + row["sdpa"]["skipped"]
        out.append(line)
    return out


def _tokens(text: str) -> list[int]:
    """``"32K,128K,1M"`` -> ``[32768, 131072, 1048576]``."""
    units = {"K": 2**10, "M": 2**20}
    values = []
    for item in text.split(","):
        item = item.strip().upper()
        scale = units.get(item[-1:], 1)
        values.append(int(item[:-1] if scale > 1 else item) * scale)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=_tokens, help="tokens per sequence, e.g. 32K,128K,1M")
    parser.add_argument("--batches", type=_tokens, help="sequences per step, e.g. 1,16")
    parser.add_argument("--budget", type=int, help="Quest token budget (default 4096)")
    parser.add_argument(
        "--impl",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="kernel implementation (auto: Triton on CUDA; torch under --smoke)",
    )
    # float16 exists for the Triton interpreter, whose bf16 tl.dot is wrong (triton 3.9).
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--out-dir", type=Path, help="where the JSON goes")
    args = parser.parse_args(argv)

    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    impl = {"auto": "torch" if smoke else None}.get(args.impl, args.impl)
    shape = dataclasses.replace(SMOKE if smoke else LLAMA_8B, dtype=getattr(torch, args.dtype))
    contexts = args.contexts or ([256, 512] if smoke else [32 * 2**10, 128 * 2**10, 2**20])
    batches = args.batches or ([1, 2] if smoke else [1, 16])
    budget = args.budget or (64 if smoke else 4096)
    if budget < shape.page_size:
        parser.error(f"--budget must be at least one page ({shape.page_size} tokens)")
    if any(c < shape.page_size or c % shape.page_size for c in contexts):
        parser.error(f"--contexts must be positive multiples of the page size {shape.page_size}")
    top_k = budget // shape.page_size
    timing = {"warmup_ms": 1, "rep_ms": 3} if smoke else {"warmup_ms": 25, "rep_ms": 100}
    graphs = device.type == "cuda"
    torch.manual_seed(0)

    check = check_correctness(shape=shape, device=device, impl=impl)
    print("correctness (Quest step with budget >= context, and merge of halves, vs SDPA):")
    print(
        "  "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()
        )
    )
    if not check["passed"]:
        print(f"FAILED {check['failures']}: no timings taken", file=sys.stderr)
        return 1

    copy_gbps = measure_copy_bandwidth(device)
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    rows = []
    for batch in batches:
        for context in contexts:
            row = run_quest(
                shape=shape,
                batch=batch,
                context=context,
                top_k=top_k,
                device=device,
                impl=impl,
                graphs=graphs,
                timing=timing,
                host_calls=2 if smoke else 20,
            )
            if "skipped" not in row:
                row["sdpa"] = run_sdpa(
                    shape=shape,
                    batch=batch,
                    context=context,
                    device=device,
                    graphs=graphs,
                    timing=timing,
                )
                if row["sdpa"].get("graph_error"):
                    row["graph_errors"]["sdpa"] = row["sdpa"]["graph_error"]
                derive(row, copy_gbps)
            status = row.get("skipped") or f"done, {row['sets']} input sets"
            print(f"  batch {batch} context {context}: {status}", flush=True)
            rows.append(row)

    columns = ["batch", "context", "sets", *OPS, "quest_total", "speedup", "score_GB/s"]
    columns += ["score_%copy", "note"]
    for mode in ("eager", "graph") if graphs else ("eager",):
        print(f"\n{mode} (ms, median):")
        print_table(table_rows(rows, mode), columns)
    print(
        "\nquest_step = scores + select + attend (no merge) by the three public launchers;"
        "\nquest_total = quest_step + merge of 2 sources;"
        "\nspeedup = sdpa / quest_step; score_GB/s counts key_min + key_max + query"
        " bytes; sets = input\nsets rotated so nothing is timed from L2 (do_bench also flushes L2)."
    )
    for row in rows:
        for name, error in row.get("graph_errors", {}).items():
            print(
                f"graph capture failed: batch {row['batch']} context {row['context']} "
                f"{name}: {error}"
            )
    finite = all(row.get("finite", True) for row in rows)
    if not finite:
        print("FAILED: non-finite Quest step output at some shape", file=sys.stderr)

    payload = {
        "config": {
            **{k: v for k, v in dataclasses.asdict(shape).items() if k != "dtype"},
            "dtype": str(shape.dtype).removeprefix("torch."),
            "token_budget": budget,
            "top_k": top_k,
            "contexts": contexts,
            "batches": batches,
            "impl": impl or "auto",
            "device": str(device),
            "smoke": smoke,
            "timing": timing,
            "check_pages_false": {
                fn.__name__: bool(launcher_options(fn))
                for fn in (append_kv, page_scores, paged_decode_attention)
            },
            "page_layout": "random permutation of the pool",
            "quest_step": "page_scores + select_pages + paged_decode_attention; merge "
            "excluded (quest_total adds it)",
        },
        "copy_gbps": copy_gbps,
        "correctness": check,
        "results": rows,
    }
    out_dir = args.out_dir
    if out_dir is None and smoke:
        out_dir = Path(tempfile.mkdtemp(prefix="longquest-bench-"))
    path = write_result("kernels", payload, out_dir=out_dir)
    print(f"wrote {path}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
