"""One rank's decode kernels at the decode benchmark's shapes, in their candidate forms.

    python benchmarks/score_variants.py [--out-dir DIR]

A sequence-parallel rank of ``benchmarks/decode.py`` scores its local pages, selects its
local top-k and attends to its share of the global top-k. This script times those
kernels alone, in CUDA graphs (``bench_graph``: L2 flushed before every replay), at a
rank's shapes of the two headline rows (8 x 192K tokens and 1 x 1M tokens on two GPUs:
6144 and 32768 local pages a sequence, Llama-3.1-8B heads), for each candidate form:

* scores: the group-as-rows form (the bf16 bounds' kernel) against the pages-as-rows form
  (``scores._AS_ROWS``; the fp8 bounds' kernel) over tile rows, warps, pipeline depth and
  programs per SM, with bf16 and fp8 bounds
  (``--bounds``); every form's scores are checked against the group-as-rows form's;
* selection: one pass against two passes (``topk._SINGLE_PASS_MAX``) against one launch
  spread over several programs a row (``topk_spread``);
* the keep step of the cross-rank top-k, per ranking block;
* sparse attention over a rank's share, per split count, with page ids looked up or given;
* the weights: every matmul of a decode step at 8 rows (``F.linear``, cuBLAS), as
  laid out now (the split MLP's down-projection is a column slice) and contiguous.

Page tables are random (a fragmented pool) or, with ``--table contiguous``, each
sequence's pages in a row. Writes JSON under benchmarks/results/
(``score-variants-<device>-<date>.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402  # noqa: E402
    bench_graph,
    environment,
    measure_copy_bandwidth,
    print_table,
    write_result,
)
from longquest.kernels import decode, global_topk, scores, topk, topk_spread  # noqa: E402
from longquest.kernels.float8 import FLOAT8_DTYPE  # noqa: E402
from longquest.kernels.quest_step import make_quest_workspace  # noqa: E402

NUM_KV_HEADS, GROUP, HEAD_DIM, PAGE_SIZE = 8, 4, 128, 16
SHAPES = {"8x192K-w2": (8, 6144), "1x1M-w2": (1, 32768)}  # (sequences, local pages each)


def make_inputs(num_seqs: int, pages: int, device: torch.device, table: str = "random") -> dict:
    """``table``: ``"random"`` page ids (a fragmented pool) or ``"contiguous"`` (each
    sequence's pages in a row, as a fresh engine's allocator hands them out)."""
    total = num_seqs * pages
    gen = torch.Generator(device=device).manual_seed(0)
    centre = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, device=device, generator=gen)
    spread = torch.rand(total, NUM_KV_HEADS, HEAD_DIM, device=device, generator=gen)
    if table == "contiguous":
        ids = torch.arange(total, device=device)
    else:
        ids = torch.randperm(total, device=device, generator=gen)
    table = ids.view(num_seqs, pages).int()
    query = torch.randn(num_seqs, NUM_KV_HEADS * GROUP, HEAD_DIM, device=device, generator=gen)
    return {
        "query": query.bfloat16(),
        "key_min": (centre - spread).bfloat16(),
        "key_max": (centre + spread).bfloat16(),
        "page_table": table,
        "num_pages": torch.full((num_seqs,), pages, dtype=torch.int32, device=device),
    }


def score_forms(grid: str = "wide") -> list[dict]:
    """``wide``: tiles, warps and programs an SM; ``fine``: around the default (smaller
    tiles, more programs, deeper pipeline)."""
    forms = [{"as_rows": False}]
    if grid == "fine":
        for block_p, warps, stages, per_sm in itertools.product(
            (32, 64), (2, 4), (3, 4), (3, 4, 6)
        ):
            forms.append(dict(as_rows=True, block_p=block_p, warps=warps, stages=stages,
                              per_sm=per_sm))  # fmt: skip
        return forms
    for block_p, warps, per_sm in itertools.product((64, 128), (2, 4, 8), (2, 3)):
        forms.append(dict(as_rows=True, block_p=block_p, warps=warps, stages=3, per_sm=per_sm))
    return forms


_DEFAULT_FORM = {
    "as_rows": scores._AS_ROWS,
    "block_p": scores._AS_ROWS_BLOCK_P,
    "warps": scores._AS_ROWS_NUM_WARPS,
    "stages": scores._AS_ROWS_NUM_STAGES,
    "per_sm": scores._AS_ROWS_PROGRAMS_PER_SM,
}


def set_form(form: dict) -> None:
    scores._AS_ROWS = form["as_rows"]  # True / False: every launch in / never in that form
    if form["as_rows"] is not False:
        scores._AS_ROWS_BLOCK_P = form["block_p"]
        scores._AS_ROWS_NUM_WARPS = form["warps"]
        scores._AS_ROWS_NUM_STAGES = form["stages"]
        scores._AS_ROWS_PROGRAMS_PER_SM = form["per_sm"]


def run_scores(inputs: dict, bounds: str, copy_gbps: float, grid: str = "wide") -> list[dict]:
    kmin, kmax = inputs["key_min"], inputs["key_max"]
    if bounds == "float8_e4m3fn":
        kmin, kmax = kmin.to(FLOAT8_DTYPE), kmax.to(FLOAT8_DTYPE)  # exact order kept
    args = (inputs["query"], kmin, kmax, inputs["page_table"], inputs["num_pages"])
    set_form({"as_rows": False})
    want = scores._page_scores_triton(*args)
    nbytes = 2 * kmin.numel() * kmin.element_size()
    rows = []
    for form in score_forms(grid):
        set_form(form)
        try:
            got = scores._page_scores_triton(*args)
            torch.cuda.synchronize()
            err = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
            ms = bench_graph(lambda: scores._page_scores_triton(*args))
        except Exception as exc:  # a form that does not compile: recorded, not fatal
            rows.append({**form, "bounds": bounds, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append(
            {
                **form,
                "bounds": bounds,
                "us": round(ms * 1e3, 2),
                "max_rel_err": err,
                "pct_copy_bw": round(100 * nbytes / (ms * 1e-3) / (copy_gbps * 1e9), 1),
            }
        )
    set_form(_DEFAULT_FORM)
    return rows


def run_select(inputs: dict, top_k: int, device: torch.device) -> list[dict]:
    """The local top-k: one pass or two, the first pass's chunk and warps, against one
    launch spread over several programs a row (programs, digit width, warps); also over the
    first 8192 pages of each row, to place the spread's threshold."""
    score = scores._page_scores_triton(*inputs.values())
    num_seqs, _, pages = score.shape
    rows = []
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    digit_bits = topk_spread.DIGIT_BITS
    workspace = topk_spread.make_select_workspace(max_rows=num_seqs * NUM_KV_HEADS,
                                                  device=device)  # fmt: skip
    for width in sorted({min(8192, pages), pages}):
        part = score[..., :width]
        n = torch.full_like(inputs["num_pages"], width)
        want = topk._select_pages_triton(part, n, top_k, True, spread=0)
        forms = [dict(spread=0, single_pass_max=4096), dict(spread=0, single_pass_max=8192)]
        forms += [dict(spread=0, single_pass_max=4096, chunk=1024, warps=8)]
        most = min(sms // (num_seqs * NUM_KV_HEADS), topk_spread.MAX_PROGRAMS)
        for programs in sorted({p for p in (2, 4, 8, 16, 32, most) if 2 <= p <= most}):
            if triton.cdiv(width, programs) > topk_spread.MAX_BLOCK:
                continue
            for bits, warps in ((8, 0), (8, 4), (4, 0), (4, 4)):
                forms.append(dict(spread=programs, bits=bits, warps=warps))
        for form in forms:
            topk._NUM_WARPS = form.get("warps", 0) if not form["spread"] else 0
            topk_spread.NUM_WARPS = form.get("warps", 0) if form["spread"] else 0
            topk_spread.DIGIT_BITS = form.get("bits", digit_bits)
            sizes = {k: form[k] for k in ("single_pass_max", "chunk") if k in form}

            def select(form=form, sizes=sizes, part=part, n=n):
                return topk._select_pages_triton(part, n, top_k, True, spread=form["spread"],
                                                 workspace=workspace, **sizes)  # fmt: skip

            row = {"pages": width, "top_k": top_k, "spread": form["spread"],
                   "bits": form.get("bits", "-"),
                   "single_pass_max": form.get("single_pass_max", "-"),
                   "chunk": form.get("chunk", "auto"),
                   "warps": form.get("warps", 0) or "auto"}  # fmt: skip
            try:
                same = bool(torch.equal(select()[1], want[1]))
                torch.cuda.synchronize()
                row.update(us=round(bench_graph(select) * 1e3, 2), same_as_two_pass=same,
                           workspace_clean=not bool(workspace.any()))  # fmt: skip
            except Exception as error:  # a form that fails is recorded, not raised
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)  # progress: a sweep can outlast its timeout
    topk._NUM_WARPS = topk_spread.NUM_WARPS = 0
    topk_spread.DIGIT_BITS = digit_bits
    return rows


def run_keep(inputs: dict, top_k: int, device: torch.device) -> list[dict]:
    """The cross-rank top-k's keep step at two ranks, per ranking block."""
    score = scores._page_scores_triton(*inputs.values())
    top, local = topk._select_pages_triton(score, inputs["num_pages"], top_k, True)
    num_seqs, pages = inputs["page_table"].shape
    offset = torch.arange(num_seqs, device=device, dtype=torch.int32)[:, None] * 2 * pages
    global_pages = offset + torch.arange(pages, device=device, dtype=torch.int32)[None, :]
    mine = global_topk.pack_candidates(top_scores=top, local_indices=local,
                                       global_pages=global_pages)  # fmt: skip
    other = global_topk.pack_candidates(top_scores=top.flip(-1), local_indices=local,
                                        global_pages=global_pages + pages)  # fmt: skip
    gathered = torch.stack((mine, other))
    want = global_topk.keep_global_top_k(gathered=gathered, local_indices=local, rank=0,
                                         impl="torch")  # fmt: skip
    saved = global_topk._RANK_BLOCK
    rows = []
    for block in (16, 32, 64):
        global_topk._RANK_BLOCK = block

        def keep():
            return global_topk.keep_global_top_k(gathered=gathered, local_indices=local, rank=0)

        same = bool(torch.equal(keep(), want))
        rows.append({"rank_block": block, "top_k": top_k,
                     "us": round(bench_graph(keep) * 1e3, 2), "same_as_torch": same})  # fmt: skip
    global_topk._RANK_BLOCK = saved
    return rows


def run_attention(inputs: dict, top_k: int, device: torch.device) -> list[dict]:
    """A rank's sparse attention at two ranks: its ~top_k / 2 pages of the global top-k at
    the front of a top_k list (-1 after), as the engine lists them, the last split
    reducing; page ids from the page table or given (physical); one GPU's whole list
    (full); and dense attention."""
    num_seqs, pages = inputs["page_table"].shape
    total = num_seqs * pages
    k_cache = torch.randn(total, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    score = scores._page_scores_triton(*inputs.values())
    _, mine = topk._select_pages_triton(score, inputs["num_pages"], top_k // 2, True)
    padded = torch.cat((mine, torch.full_like(mine, -1)), dim=-1)
    rows_index = torch.arange(num_seqs, device=device)[:, None, None]
    physical = inputs["page_table"][rows_index, padded.long().clamp(min=0)]
    physical = torch.where(padded >= 0, physical, -1).int()
    seq_lens = inputs["num_pages"] * PAGE_SIZE
    workspace = make_quest_workspace(max_num_seqs=num_seqs, num_kv_heads=NUM_KV_HEADS,
                                     device=device)  # fmt: skip
    common = (inputs["query"], k_cache, v_cache, inputs["page_table"], seq_lens)
    want, _ = decode._decode_triton(*common, mine, HEAD_DIM**-0.5, None)
    rows = []
    # The whole list used: one GPU's selection (top_k pages).
    _, full = topk._select_pages_triton(score, inputs["num_pages"], top_k, True)
    forms = [(ids, splits, 64, 2) for ids in ("logical", "physical") for splits in (None, 8, 16)]
    forms += [("logical", None, tokens, stages) for tokens in (32, 64, 128) for stages in (2, 3)
              if (tokens, stages) != (64, 2)]  # fmt: skip
    forms += [("full", None, 64, 2), ("full", 16, 64, 2), ("full", 32, 64, 2)]
    forms += [("dense", None, 64, 2)]
    saved = decode._TOKENS_PER_BLOCK, decode._NUM_STAGES
    for ids, splits, tokens, stages in forms:
        decode._TOKENS_PER_BLOCK, decode._NUM_STAGES = tokens, stages
        selected = {"dense": None, "full": full}.get(ids, padded)
        kwargs = {"counters": workspace.counters}
        if ids == "physical":
            kwargs["physical"] = physical

        def attend(selected=selected, kwargs=kwargs, splits=splits):
            return decode._decode_triton(*common, selected, HEAD_DIM**-0.5, splits, **kwargs)

        err = 0.0
        try:
            if ids in ("logical", "physical"):
                err = float((attend()[0].float() - want.float()).abs().max())
            us = round(bench_graph(attend) * 1e3, 2)
        except Exception as exc:  # a form that does not compile: recorded, not fatal
            error = f"{type(exc).__name__}: {exc}"[:200]
            rows.append({"ids": ids, "splits": splits or "auto", "tokens_per_block": tokens,
                         "stages": stages, "error": error})  # fmt: skip
            continue
        rows.append({"ids": ids, "splits": splits or "auto", "tokens_per_block": tokens,
                     "stages": stages, "list_len": padded.shape[-1],
                     "us": us, "max_abs_diff": err})  # fmt: skip
    decode._TOKENS_PER_BLOCK, decode._NUM_STAGES = saved
    del k_cache, v_cache
    return rows


def run_weights(device: torch.device, copy_gbps: float, rows: int = 8) -> list[dict]:
    """GB/s of each decode matmul (Llama-3.1-8B, the MLP split over two ranks)."""
    hidden, inter, vocab = 4096, 14336, 128256
    gen = torch.Generator(device=device).manual_seed(0)

    def weight(*shape):
        return torch.randn(*shape, device=device, generator=gen).bfloat16()

    down = weight(hidden, inter)
    cases = {
        "qkv [6144, 4096]": (weight(6144, hidden), hidden),
        "o [4096, 4096]": (weight(hidden, hidden), hidden),
        "gate_up rank slice [14336, 4096]": (weight(2 * inter, hidden)[:inter], hidden),
        "down rank slice [4096, 7168], column slice": (down[:, : inter // 2], inter // 2),
        "down rank slice [4096, 7168], contiguous": (
            down[:, : inter // 2].contiguous(),
            inter // 2,
        ),
        "lm_head [128256, 4096]": (weight(vocab, hidden), hidden),
    }
    result = []
    for name, (w, k) in cases.items():
        x = torch.randn(rows, k, device=device, generator=gen).bfloat16()
        ms = bench_graph(lambda w=w, x=x: torch.nn.functional.linear(x, w))
        gbps = w.numel() * w.element_size() / (ms * 1e-3) / 1e9
        result.append({"matmul": name, "rows": rows, "us": round(ms * 1e3, 2),
                       "pct_copy_bw": round(100 * gbps / copy_gbps, 1)})  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--label", default="")
    parser.add_argument("--parts", default="scores,select,attention,keep,weights",
                        help="comma-separated parts to time")  # fmt: skip
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated shapes to time, of {', '.join(SHAPES)}")  # fmt: skip
    parser.add_argument("--table", choices=("random", "contiguous"), default="random",
                        help="page ids: a fragmented pool or each sequence's in a row")  # fmt: skip
    parser.add_argument("--score-forms", choices=("wide", "fine"), default="wide",
                        help="which grid of score kernel forms to time")  # fmt: skip
    parser.add_argument("--bounds", default="bfloat16,float8_e4m3fn",
                        help="bounds dtypes the scores part times")  # fmt: skip
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    device = torch.device("cuda")
    copy_gbps = measure_copy_bandwidth(device)
    result = {"copy_bandwidth_gbps": round(copy_gbps, 1), "parts": sorted(parts),
              "table": args.table, "shapes": {}}  # fmt: skip
    for name in args.shapes.split(","):
        num_seqs, pages = SHAPES[name]
        inputs = make_inputs(num_seqs, pages, device, args.table)
        entry = {"num_seqs": num_seqs, "local_pages": pages, "num_kv_heads": NUM_KV_HEADS,
                 "group": GROUP, "head_dim": HEAD_DIM}  # fmt: skip
        print(f"== {name}")
        if "scores" in parts:
            entry["scores"] = []
            for bounds in args.bounds.split(","):
                entry["scores"] += run_scores(inputs, bounds, copy_gbps, args.score_forms)
            best = sorted((r for r in entry["scores"] if "us" in r), key=lambda r: r["us"])[:8]
            current = [r for r in entry["scores"] if not r["as_rows"]]
            print_table(current + best, ["bounds", "as_rows", "block_p", "warps",
                                         "stages", "per_sm", "us", "pct_copy_bw",
                                         "max_rel_err"])  # fmt: skip
            errors = [r for r in entry["scores"] if "error" in r]
            if errors:
                print(f"{len(errors)} forms failed; first: {errors[0]['error']}")
        if "select" in parts:
            entry["select"] = run_select(inputs, 128, device) + run_select(inputs, 256, device)
            print_table(entry["select"], ["pages", "top_k", "spread", "bits", "single_pass_max",
                                          "chunk", "warps", "us", "same_as_two_pass",
                                          "workspace_clean"])  # fmt: skip
            errors = [r for r in entry["select"] if "error" in r]
            if errors:
                print(f"{len(errors)} selection forms failed; first: {errors[0]['error']}")
        if "attention" in parts:
            entry["attention"] = run_attention(inputs, 128, device)
            columns = ["ids", "splits", "tokens_per_block", "stages", "list_len", "us",
                       "max_abs_diff"]  # fmt: skip
            print_table(entry["attention"], columns)
        if "keep" in parts:
            entry["keep"] = run_keep(inputs, 128, device) + run_keep(inputs, 256, device)
            columns = ["rank_block", "top_k", "us", "same_as_torch"]
            print_table(entry["keep"], columns)
        result["shapes"][name] = entry
        del inputs
    if "weights" in parts:
        result["weights"] = run_weights(device, copy_gbps)
        print_table(result["weights"], ["matmul", "rows", "us", "pct_copy_bw"])
    payload = {"name": "score-variants", "environment": environment(), **result}
    path = write_result(f"score-variants{'-' + args.label if args.label else ''}", payload,
                        out_dir=args.out_dir)  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
