"""Launch one rank's decode kernels once each, between cudaProfilerStart/Stop, for Nsight
Compute (a device-session probe, not a benchmark):

    ncu --clock-control none --profile-from-start off --section ... \\
        python benchmarks/device/ncu_probe.py

The shapes are score_variants.py's 8 x 192K row on two GPUs: scores with fp8 and bf16
bounds, and the sparse attention over a rank's share.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.score_variants import HEAD_DIM, NUM_KV_HEADS, PAGE_SIZE, make_inputs  # noqa: E402
from longquest.kernels import (  # noqa: E402
    FLOAT8_DTYPE,
    page_scores,
    paged_decode_attention,
    select_pages,
)


def main() -> int:
    device = torch.device("cuda")
    inputs = make_inputs(8, 6144, device, "contiguous")  # as a fresh engine's pool
    fp8 = dict(inputs, key_min=inputs["key_min"].to(FLOAT8_DTYPE),
               key_max=inputs["key_max"].to(FLOAT8_DTYPE))  # fmt: skip
    score = page_scores(**inputs, check_pages=False)
    _, mine = select_pages(scores=score, num_pages=inputs["num_pages"], top_k=64)
    padded = torch.cat((mine, torch.full_like(mine, -1)), dim=-1)
    total = 8 * 6144
    k_cache = torch.randn(total, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    counters = torch.zeros(8 * NUM_KV_HEADS, dtype=torch.int32, device=device)
    seq_lens = inputs["num_pages"] * PAGE_SIZE

    def launch_all():
        page_scores(**fp8, check_pages=False)
        page_scores(**inputs, check_pages=False)
        paged_decode_attention(query=inputs["query"], k_cache=k_cache, v_cache=v_cache,
                               page_table=inputs["page_table"], seq_lens=seq_lens,
                               selected=padded, check_pages=False,
                               split_counters=counters)  # fmt: skip

    launch_all()  # compile outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    launch_all()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
