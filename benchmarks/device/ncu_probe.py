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
from longquest.kernels import decode, scores, topk  # noqa: E402
from longquest.kernels.float8 import FLOAT8_DTYPE  # noqa: E402
from longquest.kernels.quest_step import make_quest_workspace  # noqa: E402


def main() -> int:
    device = torch.device("cuda")
    inputs = make_inputs(8, 6144, device, "contiguous")  # as a fresh engine's pool
    fp8 = dict(inputs, key_min=inputs["key_min"].to(FLOAT8_DTYPE),
               key_max=inputs["key_max"].to(FLOAT8_DTYPE))  # fmt: skip
    score = scores._page_scores_triton(*inputs.values())
    _, mine = topk._select_pages_triton(score, inputs["num_pages"], 64, True)
    padded = torch.cat((mine, torch.full_like(mine, -1)), dim=-1)
    total = 8 * 6144
    k_cache = torch.randn(total, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    workspace = make_quest_workspace(max_num_seqs=8, num_kv_heads=NUM_KV_HEADS, device=device)
    seq_lens = inputs["num_pages"] * PAGE_SIZE

    def launch_all():
        scores._page_scores_triton(*fp8.values())
        scores._page_scores_triton(*inputs.values())
        common = (inputs["query"], k_cache, v_cache, inputs["page_table"], seq_lens, padded)
        decode._decode_triton(*common, HEAD_DIM**-0.5, None, counters=workspace.counters)

    launch_all()  # compile outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    launch_all()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
