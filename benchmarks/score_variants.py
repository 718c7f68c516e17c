"""One rank's decode kernels at the decode benchmark's shapes, over tuning alternatives.

    python benchmarks/score_variants.py [--out-dir DIR]

A sequence-parallel rank of ``benchmarks/decode.py`` scores its local pages, selects its
local top-k and attends to its share of the global top-k. This script times those
kernels alone through the public launchers, in CUDA graphs (``bench_graph``: L2 flushed
before every replay), at a rank's shapes of the two headline rows (8 x 192K tokens and
1 x 1M tokens on two GPUs: 6144 and 32768 local pages a sequence, Llama-3.1-8B heads),
each with ``longquest.kernels.DEFAULT_TUNING`` and with alternatives to it (a
``KernelTuning`` passed in):

* scores: bf16 bounds over programs per SM, fp8 bounds (``--bounds``) over the
  pages-as-rows tiles, warps, pipeline depth and programs per SM (``score_fp8_*``); every
  result is checked against the default tuning's;
* selection: the two passes (``spread=False``) over the single-pass limit and chunk, and
  the spread selection over its part size (``spread_min_chunk``, which sets the programs a
  row);
* the keep step of the cross-rank top-k, per ranking block (``rank_block``);
* sparse attention over a rank's share, per split count, tokens a block and stages;
* the weights: every matmul of a decode step at 8 rows (``F.linear``, cuBLAS), as the
  engine lays them out (the split MLP's down-projection is a column slice) and contiguous.

Page tables are random (a fragmented pool) or, with ``--table contiguous``, each
sequence's pages in a row. Writes JSON under benchmarks/results/
(``score-variants-<device>-<date>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    bench_graph,
    environment,
    measure_copy_bandwidth,
    print_table,
    write_result,
)
from longquest.kernels import (  # noqa: E402
    DEFAULT_TUNING,
    FLOAT8_DTYPE,
    keep_global_top_k,
    make_select_workspace,
    pack_candidates,
    page_scores,
    paged_decode_attention,
    select_pages,
)
from longquest.kernels.topk_spread import spread_programs  # noqa: E402

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


def _tuned(**changes) -> object:
    return dataclasses.replace(DEFAULT_TUNING, **changes)


def _scores(inputs: dict, tuning=DEFAULT_TUNING, **bounds) -> torch.Tensor:
    args = {**inputs, **bounds}
    return page_scores(**args, check_pages=False, impl="triton", tuning=tuning)


def score_tunings(bounds: str, grid: str = "wide") -> list[dict]:
    """The score kernel's tuning alternatives for ``bounds``: programs an SM (bf16); for fp8
    (pages as the product's rows) tiles, warps, stages and programs an SM, ``wide`` or
    ``fine`` (around the default)."""
    if bounds != "float8_e4m3fn":
        return [dict(score_programs_per_sm=n) for n in (2, 3, 4, 6, 8)]
    if grid == "fine":
        values = itertools.product((32, 64), (2, 4), (3, 4), (3, 4, 6))
    else:
        values = itertools.product((64, 128), (2, 4, 8), (3,), (2, 3))
    names = ("score_fp8_block_pages", "score_fp8_num_warps", "score_fp8_num_stages",
             "score_fp8_programs_per_sm")  # fmt: skip
    return [dict(zip(names, v, strict=True)) for v in values]


def run_scores(inputs: dict, bounds: str, copy_gbps: float, grid: str = "wide") -> list[dict]:
    kmin, kmax = inputs["key_min"], inputs["key_max"]
    if bounds == "float8_e4m3fn":
        kmin, kmax = kmin.to(FLOAT8_DTYPE), kmax.to(FLOAT8_DTYPE)  # exact order kept
    want = _scores(inputs, key_min=kmin, key_max=kmax)
    nbytes = 2 * kmin.numel() * kmin.element_size()
    rows = []
    for changes in [{}, *score_tunings(bounds, grid)]:
        tuning = _tuned(**changes)
        row = {"bounds": bounds, "tuning": changes or "default"}
        try:
            got = _scores(inputs, tuning, key_min=kmin, key_max=kmax)
            torch.cuda.synchronize()
            err = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
            ms = bench_graph(lambda t=tuning: _scores(inputs, t, key_min=kmin, key_max=kmax))
        except Exception as exc:  # a tuning that does not compile: recorded, not fatal
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        pct = round(100 * nbytes / (ms * 1e-3) / (copy_gbps * 1e9), 1)
        rows.append({**row, "us": round(ms * 1e3, 2), "max_rel_err": err, "pct_copy_bw": pct})
    return rows


def run_select(inputs: dict, top_k: int, device: torch.device) -> list[dict]:
    """The local top-k: the two passes over their single-pass limit and chunk, against the
    spread selection over its part size; also over the first 8192 pages of each row."""
    score = _scores(inputs)
    num_seqs, _, pages = score.shape
    rows = []
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    workspace = make_select_workspace(max_rows=num_seqs * NUM_KV_HEADS, device=device)
    for width in sorted({min(8192, pages), pages}):
        part = score[..., :width]
        n = torch.full_like(inputs["num_pages"], width)
        want = select_pages(scores=part, num_pages=n, top_k=top_k, spread=False)
        forms = [dict(spread=False), dict(spread=False, select_single_pass_max=8192),
                 dict(spread=False, select_min_chunk=2048)]  # fmt: skip
        forms += [dict(spread=True, spread_min_chunk=c, spread_min_programs=2)
                  for c in (256, 512, 1024, 2048)]  # fmt: skip
        for form in forms:
            spread = form.pop("spread")
            tuning = _tuned(**form)
            programs = spread_programs(rows=num_seqs * NUM_KV_HEADS, max_pages=width,
                                       sm_count=sms, min_chunk=tuning.spread_min_chunk)  # fmt: skip

            def select(spread=spread, tuning=tuning, part=part, n=n):
                return select_pages(scores=part, num_pages=n, top_k=top_k, workspace=workspace,
                                    spread=spread, tuning=tuning)  # fmt: skip

            row = {"pages": width, "top_k": top_k, "spread": spread,
                   "programs": programs if spread else "-",
                   "tuning": form or "default"}  # fmt: skip
            try:
                same = bool(torch.equal(select()[1], want[1]))
                torch.cuda.synchronize()
                row.update(us=round(bench_graph(select) * 1e3, 2), same_as_two_pass=same,
                           workspace_clean=not bool(workspace.any()))  # fmt: skip
            except Exception as error:  # a tuning that fails is recorded, not raised
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)  # progress: a sweep can outlast its timeout
    return rows


def run_keep(inputs: dict, top_k: int, device: torch.device) -> list[dict]:
    """The cross-rank top-k's keep step at two ranks, per ranking block."""
    top, local = select_pages(scores=_scores(inputs), num_pages=inputs["num_pages"], top_k=top_k)
    num_seqs, pages = inputs["page_table"].shape
    offset = torch.arange(num_seqs, device=device, dtype=torch.int32)[:, None] * 2 * pages
    global_pages = offset + torch.arange(pages, device=device, dtype=torch.int32)[None, :]
    mine = pack_candidates(top_scores=top, local_indices=local, global_pages=global_pages)
    other = pack_candidates(top_scores=top.flip(-1), local_indices=local,
                            global_pages=global_pages + pages)  # fmt: skip
    gathered = torch.stack((mine, other))
    want = keep_global_top_k(gathered=gathered, local_indices=local, rank=0, impl="torch")
    rows = []
    for block in (16, 32, 64):
        tuning = _tuned(rank_block=block)

        def keep(tuning=tuning):
            return keep_global_top_k(gathered=gathered, local_indices=local, rank=0,
                                     tuning=tuning)  # fmt: skip

        same = bool(torch.equal(keep(), want))
        rows.append({"rank_block": block, "top_k": top_k,
                     "us": round(bench_graph(keep) * 1e3, 2), "same_as_torch": same})  # fmt: skip
    return rows


def run_attention(inputs: dict, top_k: int, device: torch.device) -> list[dict]:
    """A rank's sparse attention at two ranks: its ~top_k / 2 pages of the global top-k at
    the front of a top_k list (-1 after), as the engine lists them, the last split
    reducing (split counters, as the engine passes them); one GPU's whole list (full); and
    dense attention."""
    num_seqs, pages = inputs["page_table"].shape
    total = num_seqs * pages
    k_cache = torch.randn(total, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    score = _scores(inputs)
    _, mine = select_pages(scores=score, num_pages=inputs["num_pages"], top_k=top_k // 2)
    padded = torch.cat((mine, torch.full_like(mine, -1)), dim=-1)
    counters = torch.zeros(num_seqs * NUM_KV_HEADS, dtype=torch.int32, device=device)
    common = dict(query=inputs["query"], k_cache=k_cache, v_cache=v_cache,
                  page_table=inputs["page_table"], seq_lens=inputs["num_pages"] * PAGE_SIZE,
                  check_pages=False, impl="triton", split_counters=counters)  # fmt: skip
    want, _ = paged_decode_attention(selected=mine, **common)
    # The whole list used: one GPU's selection (top_k pages).
    _, full = select_pages(scores=score, num_pages=inputs["num_pages"], top_k=top_k)
    forms = [("share", splits, 64, 2) for splits in (None, 8, 16)]
    forms += [("share", None, tokens, stages) for tokens in (32, 64, 128) for stages in (2, 3)
              if (tokens, stages) != (64, 2)]  # fmt: skip
    forms += [("full", None, 64, 2), ("full", 16, 64, 2), ("full", 32, 64, 2)]
    forms += [("dense", None, 64, 2)]
    rows = []
    for ids, splits, tokens, stages in forms:
        selected = {"dense": None, "full": full}.get(ids, padded)
        tuning = _tuned(decode_tokens_per_block=tokens, decode_num_stages=stages)

        def attend(selected=selected, splits=splits, tuning=tuning):
            return paged_decode_attention(selected=selected, num_splits=splits, tuning=tuning,
                                          **common)  # fmt: skip

        row = {"ids": ids, "splits": splits or "auto", "tokens_per_block": tokens,
               "stages": stages}  # fmt: skip
        err = 0.0
        try:
            if ids == "share":
                err = float((attend()[0].float() - want.float()).abs().max())
            us = round(bench_graph(attend) * 1e3, 2)
        except Exception as exc:  # a tuning that does not compile: recorded, not fatal
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append({**row, "list_len": padded.shape[-1], "us": us, "max_abs_diff": err})
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
            default = [r for r in entry["scores"] if r["tuning"] == "default"]
            print_table(default + best, ["bounds", "tuning", "us", "pct_copy_bw",
                                         "max_rel_err"])  # fmt: skip
            errors = [r for r in entry["scores"] if "error" in r]
            if errors:
                print(f"{len(errors)} tunings failed; first: {errors[0]['error']}")
        if "select" in parts:
            entry["select"] = run_select(inputs, 128, device) + run_select(inputs, 256, device)
            print_table(entry["select"], ["pages", "top_k", "spread", "programs", "tuning",
                                          "us", "same_as_two_pass",
                                          "workspace_clean"])  # fmt: skip
            errors = [r for r in entry["select"] if "error" in r]
            if errors:
                print(f"{len(errors)} selection tunings failed; first: {errors[0]['error']}")
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
