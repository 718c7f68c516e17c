"""Prefill attention forms on one GPU: the engine's Triton kernel against torch's fused
attention backends, at the shapes of one chunk of a chunked prefill.

A chunk of ``chunk`` queries at positions ``past .. past + chunk - 1`` attends causally
to keys ``0 .. past + chunk - 1`` (Llama-3.1-8B attention: 32 query / 8 KV heads,
head_dim 128, bf16). Forms, each returning the output and the natural-log LSE:
  - ``triton``: ``longquest.kernels.prefill_attention`` (the engine's);
  - ``triton-<BM>x<BN>w<W>s<S>``: the same kernel with other tiles;
  - ``split-<backend>``: two fused torch calls merged by LSE: the past keys without a
    mask (the query heads of a KV group folded into the query length, so no K/V
    copy), the chunk's own keys with torch's top-left causal mask; backends flash,
    cudnn, efficient;
  - ``sdpa-lower-right`` (no LSE): ``F.scaled_dot_product_attention`` with
    ``causal_lower_right`` and ``enable_gqa`` — what a one-device prefill without
    LSE could call.
Also ``hf-full``: torch SDPA ``is_causal`` over the whole ``past + chunk`` tokens in one
call (transformers' single-forward prefill), for its attention TFLOP/s.

    python benchmarks/prefill_forms.py --out-dir DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from longquest.kernels import merge_attention_states, prefill_attention

HEADS, KV_HEADS, DIM = 32, 8, 128


def timed(fn, iters: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def split_form(backend: str):
    aten = torch.ops.aten

    def fused(q, k, v, causal, scale):
        # q [1, H, L, D], k/v [1, H, S, D] -> out [1, H, L, D], lse [1, H, L] (natural log)
        if backend == "flash":
            out, lse = aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale
            )[:2]
        elif backend == "cudnn":
            out, lse = aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale
            )[:2]
        else:
            out, lse = aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, causal, scale=scale
            )[:2]
        return out, lse.float().reshape(out.shape[:3])

    def run(query, key, value, past):
        num_q = query.shape[0]
        group = HEADS // KV_HEADS
        scale = DIM**-0.5
        parts = []
        if past:
            # Fold the group's query heads into the length: [1, KV, group*num_q, D].
            q = query.view(num_q, KV_HEADS, group, DIM).permute(1, 2, 0, 3)
            q = q.reshape(1, KV_HEADS, group * num_q, DIM)
            k = key[:past].transpose(0, 1)[None]
            v = value[:past].transpose(0, 1)[None]
            out, lse = fused(q, k, v, False, scale)
            out = out.view(KV_HEADS, group, num_q, DIM).permute(2, 0, 1, 3)
            out = out.reshape(num_q, HEADS, DIM)
            lse = lse.reshape(KV_HEADS, group, num_q).permute(2, 0, 1).reshape(num_q, HEADS)
            parts.append((out, lse))
        q = query.transpose(0, 1)[None]
        k = key[past:].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        v = value[past:].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        out, lse = fused(q, k, v, True, scale)
        parts.append((out[0].transpose(0, 1), lse[0].transpose(0, 1)))
        if len(parts) == 1:
            return parts[0]
        return merge_attention_states(
            outputs=torch.stack([p[0] for p in parts]), lses=torch.stack([p[1] for p in parts])
        )

    return run


def triton_form(config: dict | None):
    if config is None:
        return lambda q, k, v, past: prefill_attention(query=q, key=k, value=v, query_start=past)
    from longquest.kernels import prefill as module

    def run(q, k, v, past):
        original = module._prefill_config
        module._prefill_config = lambda *a: dict(config)
        try:
            return prefill_attention(query=q, key=k, value=v, query_start=past)
        finally:
            module._prefill_config = original

    return run


def lower_right(query, key, value, past):
    from torch.nn.attention.bias import causal_lower_right

    q = query.transpose(0, 1)[None]
    k = key.transpose(0, 1)[None]
    v = value.transpose(0, 1)[None]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bias = causal_lower_right(q.shape[2], k.shape[2])
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fused):  # never the math fallback: it would materialise the logits
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    return out[0].transpose(0, 1), None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--forms", help="comma-separated form names (default: all)")
    parser.add_argument("--cases", default="8192:0,8192:57344,8192:122880,16384:114688,32768:98304")
    args = parser.parse_args()
    torch.manual_seed(0)
    forms = {"triton": triton_form(None)}
    for bm, bn, w, s in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
                         (64, 64, 4, 3), (128, 32, 4, 3)]:  # fmt: skip
        forms[f"triton-{bm}x{bn}w{w}s{s}"] = triton_form(
            {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        )
    for backend in ("flash", "cudnn", "efficient"):
        forms[f"split-{backend}"] = split_form(backend)
    forms["sdpa-lower-right"] = lower_right
    if args.forms:
        keep = {"triton", *args.forms.split(",")}
        forms = {name: form for name, form in forms.items() if name in keep}
    rows = []
    for case in args.cases.split(","):
        chunk, past = (int(x) for x in case.split(":"))
        total = past + chunk
        q = torch.randn(chunk, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(total, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(total, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        flops = 4 * HEADS * DIM * (chunk * past + chunk * chunk / 2)
        ref_out, ref_lse = forms["triton"](q, k, v, past)
        for name, form in forms.items():
            row = {"chunk": chunk, "past": past, "form": name}
            try:
                out, lse = form(q, k, v, past)
                row["out_err"] = float((out.float() - ref_out.float()).abs().max())
                if lse is not None:
                    row["lse_err"] = float((lse - ref_lse).abs().max())
                ms = timed(functools.partial(form, q, k, v, past))
                row["ms"] = round(ms, 3)
                row["tflops"] = round(flops / ms / 1e9, 1)
            except Exception as error:  # noqa: BLE001 - a form a backend refuses is a row
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    # transformers' single forward: one causal SDPA over the whole prompt.
    for total in (65536, 131072):
        q = torch.randn(1, HEADS, total, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, total, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, total, DIM, device="cuda", dtype=torch.bfloat16)
        call = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                 enable_gqa=True)  # fmt: skip
        ms = timed(call, 3)
        flops = 4 * HEADS * DIM * total * total / 2
        row = {"chunk": total, "past": 0, "form": "hf-full", "ms": round(ms, 3),
               "tflops": round(flops / ms / 1e9, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(write_result("prefill_forms", {"rows": rows}, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
