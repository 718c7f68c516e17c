"""All-gather, all-reduce and attention merge of small payloads over peer memory, in one
Triton kernel.

Decode makes 2-3 collectives a layer on tens to hundreds of KB; NCCL takes 12-14 us each
inside a CUDA graph on two H200s, most of it fixed cost. Here each rank *pushes* its payload
straight into every peer's buffer (NVLink stores through mapped peer memory), and every
8-byte word it stores carries its own flag: 4 payload bytes beside the call's number. A
receiver polls the words themselves until each carries the current call, so there is no
fence, no separate flag and no second trip (the "LL" idea of NCCL's low-latency protocol;
an 8-byte store is never torn).

The caller owns the memory (``longquest.parallel.peer`` maps it with torch symmetric
memory) and passes every rank's buffer base address. Each rank's buffer holds
``[2 parities][world_size slots][slot_bytes // 4]`` int64 words: slot ``s`` of a parity
receives rank ``s``'s payload. ``counters`` ``[MAX_PROGRAMS]`` int32 is this rank's own
memory: the calls made so far, once per program so that no program reads a counter that
another program of the same call writes. Program ``p`` of a call moves chunk ``p``:

1. ``call = counters[p] % 2**30 + 1``, ``parity = call % 2``. Every rank makes the same calls,
   so ``call`` is the same number on every rank and in every program of a call: a word's
   tag names one call, whatever the chunking of earlier calls. (After 2**30 calls it wraps
   from even to odd, so the parities keep alternating.)
2. Push: each 4-byte word of the chunk goes, as ``call << 32 | word``, into slot ``rank`` of
   parity ``parity`` of every rank's buffer (its own too).
3. Finish: for every source rank, poll its slot's words of the chunk until all carry
   ``call``, then clear them (0: no call's tag). Gather: copy them to ``out[source]``.
   Reduce: sum them in rank order, in fp32 (the same order on every rank, so the same
   bits), and write the sum to ``out``. Then ``counters[p] = call``; program 0 also sets
   the counters of the programs this call does not have.

Modes: a gather, a sum, a merge of partial attention states (the finish merges them, so
the states never make a round trip through memory) and a gather of top-k candidates
whose push packs them (score bits beside global page ids) as it sends them.

Why two parities suffice: rank A pushes call ``c + 2`` into B's parity of call ``c`` only
after A's kernel of call ``c + 1`` saw all of B's words of ``c + 1``, which B pushes in a
kernel that starts after B's kernel of call ``c`` (its polling included) has finished.
Rank A may push ``c + 1`` while B still polls ``c``: that goes to the other parity.

Every call moves at least one word (the launchers skip empty payloads on every rank
alike): a call that polled nothing would let a rank run two calls ahead. Every word a
call writes is polled and cleared by its receiver in that call, so between calls the
buffers hold zeros only: when call numbers repeat after 2**30 calls, no word left from an
earlier call can pass for a fresh one. The clearing store is ordered before any later
write to the word: that write belongs to call ``c + 2`` or later, which the writer makes
only after it saw the receiver's push of ``c + 1``, from a kernel that starts after the
clearing kernel has finished.

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
from longquest.kernels._device import now_ns, trap
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning

MAX_PROGRAMS = 32  # the most programs one call may use
_TIMEOUT_NS = 60_000_000_000  # a wait longer than 60 s traps


_SUMMED = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUM_DTYPES = tuple(_SUMMED)  # what a reduce sums


def buffer_bytes(*, world_size: int, slot_bytes: int) -> int:
    """Bytes each rank's buffer needs for payloads of up to ``slot_bytes`` (every 4 payload
    bytes travel as an 8-byte word)."""
    return 2 * world_size * 2 * slot_bytes


@triton.jit
def _unpack_sum(words, total_lo, total_hi, DTYPE: tl.constexpr):
    """Add the payload ``words`` (int32) of one rank, read as ``DTYPE``, to fp32 sums: one
    per word for 4-byte types, the low and high halves apart for 2-byte types."""
    if DTYPE == tl.float32:
        total_lo += words.to(tl.float32, bitcast=True)
    else:
        low = (words & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True)
        high = (words >> 16).to(tl.int16).to(DTYPE, bitcast=True)
        total_lo += low.to(tl.float32)
        total_hi += high.to(tl.float32)
    return total_lo, total_hi


@triton.jit
def _pack_sum(total_lo, total_hi, DTYPE: tl.constexpr):
    """The fp32 sums rounded once to ``DTYPE``, as int32 payload words."""
    if DTYPE == tl.float32:
        words = total_lo.to(tl.int32, bitcast=True)
    else:
        low = total_lo.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        high = total_hi.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32)
        words = low | (high << 16)
    return words


@triton.jit
def _poll(slot, offsets, inside, tag, call, ON_GPU: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """The words at ``slot + offsets`` once every one inside carries ``tag``."""
    words = tl.load(slot + offsets, mask=inside, other=0, volatile=True)
    late = tl.sum(tl.ravel(((words & ~0xFFFFFFFF) != tag) & inside), axis=0)
    started = now_ns(call, ON_GPU)
    while late > 0:
        if now_ns(call, ON_GPU) - started > TIMEOUT_NS:
            trap(call, ON_GPU)
        words = tl.load(slot + offsets, mask=inside, other=0, volatile=True)
        late = tl.sum(tl.ravel(((words & ~0xFFFFFFFF) != tag) & inside), axis=0)
    return words


@triton.jit
def _as_float(words):
    return words.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _finish_merge(
    own, slot_words, out_ptr, lse_ptr, program, chunk, numel, tag, call,
    WORLD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ON_GPU: tl.constexpr, TIMEOUT_NS: tl.constexpr,
):  # fmt: skip
    """Merge mode's finish: the program's rows of ``[rows, HEAD_DIM + 1]`` partial states
    (out | lse, fp32) from every rank, merged as ``merge_attention_states`` does; the
    words read are cleared."""
    width = HEAD_DIM + 1
    per_program = chunk // width
    first = program * per_program
    last = tl.minimum(first + per_program, numel // width)
    dims = tl.arange(0, HEAD_DIM)
    for tile in range(first, last, BLOCK_ROWS):  # a few rows at a time: bounded registers
        rows = tile + tl.arange(0, BLOCK_ROWS)
        mine = rows < last
        lse_at = rows * width + HEAD_DIM
        out_at = rows[:, None] * width + dims[None, :]
        # Pass 1: the largest lse, so that every weight is exp(<= 0).
        top = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        for source in tl.static_range(WORLD):
            slot = (own + source * slot_words * 8).to(tl.pointer_type(tl.int64))
            lse = _as_float(_poll(slot, lse_at, mine, tag, call, ON_GPU, TIMEOUT_NS))
            top = tl.maximum(top, lse)
        top = tl.where(top == float("-inf"), 0.0, top)  # every source empty: exp(-inf) = 0
        # Pass 2: the weighted sum; an empty source's out is never read.
        acc = tl.zeros([BLOCK_ROWS, HEAD_DIM], tl.float32)
        total = tl.zeros([BLOCK_ROWS], tl.float32)
        for source in tl.static_range(WORLD):
            slot = (own + source * slot_words * 8).to(tl.pointer_type(tl.int64))
            lse = _as_float(tl.load(slot + lse_at, mask=mine, other=0, volatile=True))
            has_tokens = (lse > float("-inf")) & mine
            weight = tl.where(has_tokens, tl.exp(lse - top), 0.0)
            # An empty source's out is polled too (it is on its way): it is cleared below.
            words = _poll(slot, out_at, mine[:, None], tag, call, ON_GPU, TIMEOUT_NS)
            acc += weight[:, None] * tl.where(has_tokens[:, None], _as_float(words), 0.0)
            total += weight
            # Every thread has read the words (a small tile is replicated over threads, and
            # its poll's reduction may not cross warps) before one replica clears them.
            tl.debug_barrier()
            tl.store(slot + out_at, tl.zeros([BLOCK_ROWS, HEAD_DIM], tl.int64), mask=mine[:, None])
            tl.store(slot + lse_at, tl.zeros([BLOCK_ROWS], tl.int64), mask=mine)
        safe = tl.where(total > 0, total, 1.0)
        out = tl.where(total[:, None] > 0, acc / safe[:, None], 0.0)
        lse = tl.where(total > 0, top + tl.log(safe), float("-inf"))
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mine[:, None])  # fmt: skip
        tl.store(lse_ptr + rows, lse, mask=mine)


@triton.jit
def _exchange_kernel(
    src_ptr, out_ptr, lse_ptr, bases_ptr, counters_ptr,
    numel, chunk, slot_words, rank, index_ptr, table_ptr, table_stride, row_len,
    WORLD: tl.constexpr, MAX_PROGS: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
    DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    PUSH: tl.constexpr, FINISH: tl.constexpr, ON_GPU: tl.constexpr, TIMEOUT_NS: tl.constexpr,
):  # fmt: skip
    # src_ptr: int32 payload words; numel, chunk: in words. MODE 0 gathers into out_ptr
    # (int32 words), 1 sums into it (int32 words of DTYPE), 2 merges into it (see
    # _finish_merge) and into lse_ptr; 3 gathers top-k candidates packed on the way
    # (see peer_gather_candidates): src_ptr holds their score bits, index_ptr their local
    # pages, table_ptr the global page of each local page (rows of table_stride; row_len
    # candidates a sequence).
    program = tl.program_id(0)
    slot_words = slot_words.to(tl.int64)  # slot offsets pass 2**31 bytes at large slots
    call = tl.load(counters_ptr + program) % (1 << 30) + 1
    tag = call.to(tl.int64) << 32
    parity = (call % 2).to(tl.int64)
    lo = program * chunk
    hi = tl.minimum(lo + chunk, numel)
    lanes = tl.arange(0, BLOCK)
    if PUSH:
        into = (parity * WORLD + rank) * slot_words * 8
        for start in range(lo, hi, BLOCK):
            offsets = start + lanes
            inside = offsets < hi
            if MODE == 3:  # word 2c: candidate c's score bits; 2c + 1: its global page
                candidate = offsets // 2
                is_page = (offsets % 2) == 1
                bits = tl.load(src_ptr + candidate, mask=inside & ~is_page, other=0)
                local = tl.load(index_ptr + candidate, mask=inside & is_page, other=-1)
                seq = (candidate // row_len).to(tl.int64)
                page = tl.load(table_ptr + seq * table_stride + local,
                               mask=inside & is_page & (local >= 0), other=-1)  # fmt: skip
                payload = tl.where(is_page, page, bits)
            else:
                payload = tl.load(src_ptr + offsets, mask=inside)
            words = tag | payload.to(tl.uint32, bitcast=True).to(tl.int64)
            for peer in tl.static_range(WORLD):  # itself too: one way to read every slot
                slot = (tl.load(bases_ptr + peer) + into).to(tl.pointer_type(tl.int64))
                tl.store(slot + offsets, words, mask=inside)
    if FINISH:
        own = tl.load(bases_ptr + rank) + parity * WORLD * slot_words * 8
        if MODE == 2:
            _finish_merge(
                own, slot_words, out_ptr, lse_ptr, program, chunk, numel, tag, call,
                WORLD, HEAD_DIM, BLOCK_ROWS, ON_GPU, TIMEOUT_NS,
            )  # fmt: skip
        else:
            for start in range(lo, hi, BLOCK):
                offsets = start + lanes
                inside = offsets < hi
                total_lo = tl.zeros([BLOCK], tl.float32)
                total_hi = tl.zeros([BLOCK], tl.float32)
                for source in tl.static_range(WORLD):
                    slot = (own + source * slot_words * 8).to(tl.pointer_type(tl.int64))
                    payload = _poll(slot, offsets, inside, tag, call, ON_GPU, TIMEOUT_NS)
                    tl.store(slot + offsets, tl.zeros([BLOCK], tl.int64), mask=inside)
                    payload = payload.to(tl.int32)
                    if MODE == 1:
                        total_lo, total_hi = _unpack_sum(payload, total_lo, total_hi, DTYPE)
                    else:
                        tl.store(out_ptr + source * numel + offsets, payload, mask=inside)
                if MODE == 1:
                    packed = _pack_sum(total_lo, total_hi, DTYPE)
                    tl.store(out_ptr + offsets, packed, mask=inside)
        tl.store(counters_ptr + program, call)
        # The counters of programs this call does not have advance too (program 0 writes
        # them; no program of this call reads them): every counter holds the same call.
        rest = tl.arange(0, MAX_PROGS)
        unused = (rest >= tl.num_programs(0)) & (rest * 0 + program == 0)
        tl.store(counters_ptr + rest, tl.full([MAX_PROGS], 0, tl.int32) + call, mask=unused)


def check_exchange(
    *,
    device: torch.device,
    bases: torch.Tensor,
    counters: torch.Tensor,
    rank: int,
    phases: str,
    slot_bytes: int,
    nbytes: int,
) -> None:
    check_tensor("bases", bases, ndim=1, dtypes=(torch.int64,), device=device)
    check_tensor("counters", counters, ndim=1, dtypes=(torch.int32,), device=device)
    if counters.numel() != MAX_PROGRAMS:
        raise ValueError(f"counters must have {MAX_PROGRAMS} entries, got {counters.numel()}")
    if not 0 <= rank < bases.numel():
        raise ValueError(f"rank {rank} is outside the {bases.numel()} ranks of bases")
    if phases not in ("both", "push", "finish"):
        raise ValueError(f"phases must be 'both', 'push' or 'finish', got {phases!r}")
    if phases == "both" and device.type != "cuda" and bases.numel() > 1:
        raise ValueError(
            "off the GPU the programs run one after another, so a call of several ranks "
            "must run its phases apart: phases='push' on every rank, then 'finish'"
        )
    if slot_bytes % 16:
        raise ValueError(f"slot_bytes must be a multiple of 16, got {slot_bytes}")
    if nbytes > slot_bytes:
        raise ValueError(f"payload of {nbytes} bytes exceeds the {slot_bytes}-byte slots")
    if nbytes % 4:
        raise ValueError(f"payload of {nbytes} bytes: it must be whole 4-byte words (pad it)")


def word_chunks(nbytes: int, programs: int | None, tuning: KernelTuning) -> tuple[int, int]:
    """How many programs move a payload of ``nbytes`` (> 0), and the 4-byte words each
    moves (whole loop blocks of ``tuning.peer_block_words``)."""
    if programs is None:
        programs = triton.cdiv(nbytes, tuning.peer_min_chunk_bytes)
    programs = max(1, min(MAX_PROGRAMS, programs))
    block = tuning.peer_block_words
    return programs, triton.cdiv(triton.cdiv(nbytes // 4, programs), block) * block


def launch_exchange(src, out, lse, *, bases, counters, rank, slot_bytes, programs, chunk, phases,
            mode, tuning, dtype=tl.float32, head_dim=1, block_rows=1, words=None,
            index=None, table=None, row_len=1) -> None:  # fmt: skip
    words = src.numel() * src.element_size() // 4 if words is None else words
    _exchange_kernel[(programs,)](
        src.view(-1).view(torch.int32), out, lse, bases, counters,
        words, chunk, slot_bytes // 4, rank,
        counters if index is None else index, counters if table is None else table,
        0 if table is None else table.stride(0), row_len,
        WORLD=bases.numel(), MAX_PROGS=MAX_PROGRAMS, BLOCK=tuning.peer_block_words, MODE=mode,
        DTYPE=dtype, HEAD_DIM=head_dim, BLOCK_ROWS=block_rows,
        PUSH=phases != "finish", FINISH=phases != "push", ON_GPU=src.device.type == "cuda",
        TIMEOUT_NS=_TIMEOUT_NS, num_warps=4,
    )  # fmt: skip


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
    tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """All-gather (``reduce=False``) or sum (``reduce=True``) ``src`` over the ranks.

    src: contiguous payload, any shape, of whole 4-byte words and at most ``slot_bytes``.
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
    tuning: the programs' sizes (``peer_*`` fields); every rank must pass the same.
    Every rank must make the same calls, in the same order, with the same sizes.
    Returns ``out``.
    """
    nbytes = src.numel() * src.element_size()
    check_exchange(device=src.device, bases=bases, counters=counters, rank=rank,
                    phases=phases, slot_bytes=slot_bytes, nbytes=nbytes)  # fmt: skip
    if not src.is_contiguous() or not out.is_contiguous():
        raise ValueError("src and out must be contiguous")
    if out.dtype != src.dtype or out.device != src.device:
        raise ValueError(
            f"out must be {src.dtype} on {src.device}, got {out.dtype} on {out.device}"
        )
    shape = tuple(src.shape) if reduce else (bases.numel(), *src.shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if reduce and src.dtype not in _SUMMED:
        raise ValueError(f"a reduce sums fp32, fp16 or bf16, got {src.dtype}")
    if src.data_ptr() == out.data_ptr() and not reduce and src.numel():
        raise ValueError("a gather's out must not overlap src")
    if nbytes == 0:  # nothing to move: every rank skips the call alike, no counter moves
        return out
    programs, chunk = word_chunks(nbytes, programs, tuning)
    launch_exchange(src, out.view(-1).view(torch.int32), counters, bases=bases,
                    counters=counters, rank=rank, slot_bytes=slot_bytes, programs=programs,
                    chunk=chunk, phases=phases, mode=1 if reduce else 0, tuning=tuning,
                    dtype=_SUMMED.get(src.dtype, tl.float32))  # fmt: skip
    return out
