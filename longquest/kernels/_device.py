"""Device facts and raw-PTX helpers shared by this package's kernels.

``sm_count`` and ``on_gpu`` size and guard launches; ``now_ns``, ``trap`` and
``fence_gpu`` are the inline-assembly pieces of the kernels whose programs wait for
each other (spread selection, peer collectives, the decode kernel's last-split
reduction). Each compiles to nothing under Triton's CPU interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 off CUDA (the interpreter runs programs
    one by one, so fewer is faster)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_gpu(device: torch.device) -> bool:
    """Kernels run on the GPU itself: CUDA tensors, and not Triton's interpreter (known
    through ``triton.knobs``, from Triton 3.4; older ones: CUDA tensors only)."""
    knobs = getattr(triton, "knobs", None)
    interpreting = knobs is not None and bool(knobs.runtime.interpret)
    return device.type == "cuda" and not interpreting


@triton.jit
def fence_gpu(x, FENCE: tl.constexpr):
    """Order this thread's earlier global stores before its later memory operations,
    GPU-wide. Every thread runs it before a program publishes its stores with an atomic
    ticket (the ticket itself is taken by one thread). A no-op under the interpreter,
    whose programs run one after another."""
    if FENCE:
        tl.inline_asm_elementwise(
            "fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip


@triton.jit
def now_ns(x, ON_GPU: tl.constexpr):
    """The GPU's global timer in ns (0 under the interpreter); ``x`` only gives it a shape."""
    if ON_GPU:
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1
        )
    return x.to(tl.int64) * 0


@triton.jit
def trap(x, ON_GPU: tl.constexpr):
    """Abort the kernel (a CUDA error instead of a hang); nothing under the interpreter."""
    if ON_GPU:
        tl.inline_asm_elementwise(
            "trap;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1
        )
