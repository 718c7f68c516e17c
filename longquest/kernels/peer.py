"""All-gather and all-reduce of small payloads over peer memory, in one Triton kernel.

Decode makes 2-3 collectives a layer on tens to hundreds of KB; NCCL takes 12-14 us each
inside a CUDA graph on two H200s, most of it fixed cost. Here each rank *pushes* its payload
straight into every rank's buffer (NVLink stores through mapped peer memory), raises one
flag per program on every peer, and waits for the peers' flags on its own buffer: one
kernel, one one-way trip.

The caller owns the memory (``longquest.parallel.peer`` maps it with torch symmetric
memory) and passes every rank's buffer base address. Each rank's buffer, in bytes::

    data:  [2 parities][world_size slots][slot_bytes]   slot s holds rank s's payload
    flags: [world_size sources][MAX_PROGRAMS] int32     flags[s][p]: last call of program
                                                         p whose chunk rank s has pushed

plus ``counters`` ``[MAX_PROGRAMS]`` int32, this rank's own memory: the calls program p has
finished. Program ``p`` of a call moves chunk ``p`` of the payload:

1. ``call = counters[p] + 1``, ``parity = call % 2``. Every rank makes the same calls
   with the same sizes, so ``call`` is the same number on every rank.
2. Push its chunk into slot ``rank`` of parity ``parity`` of every rank's buffer.
3. Fence (system scope), barrier the program's threads, then one release store of
   ``call`` into ``flags[rank][p]`` of every rank.
4. Wait (acquire, system scope) until ``flags[s][p] >= call`` for every other rank ``s``.
5. Gather: copy chunk ``p`` of every slot to ``out[s]``. Reduce: sum chunk ``p`` over the
   slots in rank order, in fp32 (the same order on every rank, so the same result), and
   write it to ``out``. Then ``counters[p] = call``.

Why two parities suffice: rank A pushes call ``c + 2`` of program p into B's parity of call
``c`` only after A's call ``c + 1`` saw B's flag ``c + 1``, which B raises in a kernel that
starts after B's kernel of call ``c`` (its step 5 included) has finished. Why ``>=``: A may
already have raised ``c + 1`` (into the other parity) while B still waits for ``c``. Flags
only grow, so nothing is reset and no stale flag can pass for a new one.

A rank that never arrives (a mismatched call) makes the others trap after
``_TIMEOUT_NS``: a CUDA error instead of a hang.

Under ``TRITON_INTERPRET=1`` programs run one after another, so the tests run the phases
as separate launches (``phases``): every rank pushes, then every rank finishes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import check_tensor

MAX_PROGRAMS = 32  # flags per source rank: the most programs one call may use
_MIN_CHUNK_BYTES = 8192  # a program moves at least this much (fewer flags to wait for)
_BLOCK_BYTES = 4096  # bytes a program moves per loop step
_TIMEOUT_NS = 60_000_000_000  # a wait longer than 60 s traps


def flags_bytes(world_size: int) -> int:
    """Bytes of the flags region after the data (see the module docstring)."""
    return world_size * MAX_PROGRAMS * 4


def buffer_bytes(*, world_size: int, slot_bytes: int) -> int:
    """Bytes each rank's buffer needs for payloads of up to ``slot_bytes``."""
    return 2 * world_size * slot_bytes + flags_bytes(world_size)


@triton.jit
def _system_fence(x, ON_GPU: tl.constexpr):
    """Order this thread's earlier memory operations before its later ones, system-wide
    (peers' stores through NVLink included). A no-op under the interpreter."""
    if ON_GPU:
        tl.inline_asm_elementwise(
            "fence.acq_rel.sys;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip


@triton.jit
def _now_ns(x, ON_GPU: tl.constexpr):
    if ON_GPU:
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1
        )
    return x.to(tl.int64) * 0


@triton.jit
def _trap(x, ON_GPU: tl.constexpr):
    if ON_GPU:
        tl.inline_asm_elementwise(
            "trap;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _exchange_kernel(
    src_ptr, out_ptr, bases_ptr, counters_ptr,
    numel, chunk, slot_bytes, flags_offset, rank,
    WORLD: tl.constexpr, MAX_PROGS: tl.constexpr, BLOCK: tl.constexpr, REDUCE: tl.constexpr,
    PUSH: tl.constexpr, FINISH: tl.constexpr, ON_GPU: tl.constexpr, TIMEOUT_NS: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    call = tl.load(counters_ptr + program) + 1
    parity = (call % 2).to(tl.int64)
    elem = src_ptr.dtype.element_ty
    lo = program * chunk
    hi = tl.minimum(lo + chunk, numel)
    lanes = tl.arange(0, BLOCK)
    slot_of_rank = (parity * WORLD + rank) * slot_bytes
    if PUSH:
        for start in range(lo, hi, BLOCK):
            offsets = start + lanes
            inside = offsets < hi
            payload = tl.load(src_ptr + offsets, mask=inside)
            for peer in tl.static_range(WORLD):
                slot = (tl.load(bases_ptr + peer) + slot_of_rank).to(tl.pointer_type(elem))
                tl.store(slot + offsets, payload, mask=inside)
        _system_fence(call, ON_GPU)
        tl.debug_barrier()
        for peer in tl.static_range(WORLD):
            flags = (tl.load(bases_ptr + peer) + flags_offset).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(flags + rank * MAX_PROGS + program, call, sem="release", scope="sys")
    if FINISH:
        own = tl.load(bases_ptr + rank)
        flags = (own + flags_offset).to(tl.pointer_type(tl.int32))
        for source in tl.static_range(WORLD):
            if source != rank:
                flag = flags + source * MAX_PROGS + program
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
                started = _now_ns(call, ON_GPU)
                while seen < call:
                    if _now_ns(call, ON_GPU) - started > TIMEOUT_NS:
                        _trap(call, ON_GPU)
                    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        _system_fence(call, ON_GPU)
        tl.debug_barrier()
        data = own + parity * WORLD * slot_bytes
        for start in range(lo, hi, BLOCK):
            offsets = start + lanes
            inside = offsets < hi
            if REDUCE:
                total = tl.zeros([BLOCK], tl.float32)
                for source in tl.static_range(WORLD):
                    slot = (data + source * slot_bytes).to(tl.pointer_type(elem))
                    total += tl.load(slot + offsets, mask=inside).to(tl.float32)
                tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=inside)
            else:
                for source in tl.static_range(WORLD):
                    slot = (data + source * slot_bytes).to(tl.pointer_type(elem))
                    payload = tl.load(slot + offsets, mask=inside)
                    tl.store(out_ptr + source * numel + offsets, payload, mask=inside)
        tl.store(counters_ptr + program, call)


def peer_exchange(
    *,
    src: torch.Tensor,
    out: torch.Tensor,
    bases: torch.Tensor,
    counters: torch.Tensor,
    rank: int,
    slot_bytes: int,
    reduce: bool,
    programs: int | None = None,
    phases: str = "both",
) -> torch.Tensor:
    """All-gather (``reduce=False``) or sum (``reduce=True``) ``src`` over the ranks.

    src: contiguous payload, any shape; ``src.numel() * src.element_size() <= slot_bytes``.
        A gather moves it bit for bit (any dtype); a reduce takes fp32, fp16 or bf16.
    out: contiguous, ``src``'s dtype; ``[world_size, *src.shape]`` for a gather,
        ``src.shape`` for a reduce (it may be ``src`` itself: an in-place sum).
    bases: ``[world_size]`` int64 on ``src``'s device — every rank's buffer base address
        as this process maps it, each buffer ``buffer_bytes(world_size, slot_bytes)`` long
        and zeroed before the first call.
    counters: ``[MAX_PROGRAMS]`` int32 on the device, this rank's own, zeroed once.
    rank: this rank's index in ``bases``.
    programs: how many programs split the payload (default from its size); every rank
        must pass the same.
    phases: ``"both"``; ``"push"`` or ``"finish"`` run one half (tests, see the module
        docstring).
    Every rank must make the same calls, in the same order, with the same sizes.
    Returns ``out``.
    """
    world_size = bases.numel()
    check_tensor("bases", bases, ndim=1, dtypes=(torch.int64,), device=src.device)
    check_tensor("counters", counters, ndim=1, dtypes=(torch.int32,), device=src.device)
    if counters.numel() != MAX_PROGRAMS:
        raise ValueError(f"counters must have {MAX_PROGRAMS} entries, got {counters.numel()}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the {world_size} ranks of bases")
    if phases not in ("both", "push", "finish"):
        raise ValueError(f"phases must be 'both', 'push' or 'finish', got {phases!r}")
    if not src.is_contiguous() or not out.is_contiguous():
        raise ValueError("src and out must be contiguous")
    if out.dtype != src.dtype or out.device != src.device:
        raise ValueError(
            f"out must be {src.dtype} on {src.device}, got {out.dtype} on {out.device}"
        )
    shape = tuple(src.shape) if reduce else (world_size, *src.shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if reduce and src.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"a reduce sums fp32, fp16 or bf16, got {src.dtype}")
    size = src.element_size()
    if src.numel() * size > slot_bytes:
        raise ValueError(
            f"payload of {src.numel() * size} bytes exceeds the {slot_bytes}-byte slots"
        )
    if slot_bytes % 16:
        raise ValueError(f"slot_bytes must be a multiple of 16, got {slot_bytes}")
    numel = src.numel()
    if programs is None:
        programs = triton.cdiv(numel * size, _MIN_CHUNK_BYTES)
    programs = max(1, min(MAX_PROGRAMS, programs))
    block = _BLOCK_BYTES // size
    chunk = triton.cdiv(triton.cdiv(max(numel, 1), programs), block) * block
    on_gpu = src.device.type == "cuda"
    _exchange_kernel[(programs,)](
        src, out, bases, counters,
        numel, chunk, slot_bytes, 2 * world_size * slot_bytes, rank,
        WORLD=world_size, MAX_PROGS=MAX_PROGRAMS, BLOCK=block, REDUCE=reduce,
        PUSH=phases != "finish", FINISH=phases != "push", ON_GPU=on_gpu,
        TIMEOUT_NS=_TIMEOUT_NS, num_warps=4,
    )  # fmt: skip
    return out
