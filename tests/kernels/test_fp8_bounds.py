"""fp8 (e4m3fn) Quest key bounds: directed rounding, append_kv, page_scores, a Quest step.

The bounds must stay bounds: the stored min is the largest e4m3fn value <= the true min,
the stored max the smallest >= the true max, so a page's score is still an upper bound of
``q . k`` for every key of the page.
"""

import pytest
import torch
import triton
import triton.language as tl

from longquest.kernels import paged_decode_attention, select_pages
from longquest.kernels.append import append_kv, plan_append
from longquest.kernels.float8 import (
    FLOAT8_DTYPE,
    check_keys_fit_float8,
    directed_float8,
    round_to_float8,
)
from longquest.kernels.ref import append_kv_ref, page_scores_ref
from longquest.kernels.scores import page_scores
from tests.kernels.test_append import _pool

IMPLS = ("triton", "torch")
SMALLEST = 2.0**-9  # smallest positive (subnormal) e4m3fn value


def _finite_float8() -> torch.Tensor:
    """Every finite e4m3fn value (both zeros included) as fp32, ascending."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = bits.view(FLOAT8_DTYPE).float()
    return values[~values.isnan()].sort().values


def _probe_values() -> torch.Tensor:
    """Random values over many binades, every representable value and its neighbours,
    zeros, the range's edges and beyond."""
    gen = torch.Generator().manual_seed(0)
    table = _finite_float8()
    scales = 2.0 ** torch.randint(-14, 9, (4000,), generator=gen).float()
    randoms = torch.randn(4000, generator=gen) * scales
    edges = torch.tensor([0.0, -0.0, 1e-10, -1e-10, 448.0, -448.0, 447.9, -447.9, SMALLEST / 2])
    return torch.cat([randoms, table, table * (1 + 2**-6), table * (1 - 2**-6), edges])


def _brute_force(x: torch.Tensor, direction: str) -> torch.Tensor:
    """The nearest finite e4m3fn value below (above) ``x``, by search in the table."""
    table = _finite_float8().unique()  # -0 and +0 merge
    if direction == "down":
        return table[torch.searchsorted(table, x, right=True) - 1]
    return table[torch.searchsorted(table, x, right=False)]


@pytest.mark.parametrize("direction", ["down", "up"])
def test_directed_rounding_is_the_nearest_value_on_its_side(direction):
    x = _probe_values()
    x = x[x.abs() <= 448]  # beyond: clamped, see test_directed_rounding_exact_zero_and_clamped
    got = round_to_float8(x, direction=direction)
    assert got.dtype == FLOAT8_DTYPE and got.shape == x.shape
    assert not got.float().isnan().any()
    assert torch.equal(got.float(), _brute_force(x, direction))
    if direction == "down":
        assert (got.float() <= x).all()
    else:
        assert (got.float() >= x).all()


def test_directed_rounding_exact_zero_and_clamped():
    table = _finite_float8()
    for direction in ("down", "up"):
        assert torch.equal(round_to_float8(table, direction=direction).float(), table)
        # Exact on model-dtype inputs too.
        bf16 = table.bfloat16()
        assert torch.equal(round_to_float8(bf16, direction=direction).float(), table)
    down = round_to_float8(torch.tensor([0.0, -0.0, -1e-10, 1e-10]), direction="down").float()
    up = round_to_float8(torch.tensor([0.0, -0.0, -1e-10, 1e-10]), direction="up").float()
    assert down.tolist() == [0.0, 0.0, -SMALLEST, 0.0]
    assert up.tolist() == [0.0, 0.0, 0.0, SMALLEST]
    # Beyond the range: clamped to +-448 (no longer a bound on that side), never NaN.
    beyond = torch.tensor([500.0, -500.0, float("inf"), float("-inf"), 1e30])
    for direction in ("down", "up"):
        got = round_to_float8(beyond, direction=direction).float()
        assert got.tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]
    with pytest.raises(ValueError, match="direction must be"):
        round_to_float8(beyond, direction="nearest")


@triton.jit
def _round_kernel(x_ptr, down_ptr, up_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(down_ptr + offsets, directed_float8(x, True), mask=mask)
    tl.store(up_ptr + offsets, directed_float8(x, False), mask=mask)


def test_triton_rounding_matches_torch(device):
    x = _probe_values()
    x = torch.cat([x, torch.tensor([500.0, -500.0, float("inf"), float("-inf")])]).to(device)
    down = torch.empty(x.shape, dtype=FLOAT8_DTYPE, device=device)
    up = torch.empty_like(down)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, down, up, x.numel(), BLOCK=1024)
    for direction, got in (("down", down), ("up", up)):
        want = round_to_float8(x.cpu(), direction=direction)
        assert torch.equal(_bits(got.cpu()), _bits(want)), direction


def test_check_keys_fit_float8():
    check_keys_fit_float8(keys=torch.tensor([448.0, -448.0]))
    check_keys_fit_float8(keys=torch.empty(0))
    for bad in (448.5, -1e4, float("nan")):
        with pytest.raises(ValueError, match="beyond the float8_e4m3fn range"):
            check_keys_fit_float8(keys=torch.tensor([1.0, bad]))


# ----------------------------------------------------------------------------- append


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors compared bit for bit (torch.equal has no fp8 kernel); others as they are."""
    return t.view(torch.uint8) if t.dtype == FLOAT8_DTYPE else t


def _fp8_pools(device, *, dtype, **sizes):
    """K/V pages in ``dtype`` and fp8 bounds, all garbage that must never leak in."""
    return _pool(device, dtype=dtype, bounds_dtype=FLOAT8_DTYPE, **sizes)


def _steps(pages, chunks, *, page_size, heads, head_dim, dtype, device, seed):
    """Tokens of one sequence on ``pages``; keys over many binades (and some exactly
    representable), so the rounding is exercised."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for start, end in chunks:
        slots = [pages[p // page_size] * page_size + p % page_size for p in range(start, end)]
        scale = 2.0 ** torch.randint(-8, 7, (end - start, heads, head_dim), generator=gen)
        key = torch.randn(end - start, heads, head_dim, generator=gen) * scale
        key[..., :4] = key[..., :4].to(FLOAT8_DTYPE).float()  # representable: kept exactly
        value = torch.randn(end - start, heads, head_dim, generator=gen)
        steps.append(
            (
                torch.tensor(slots, device=device),
                key.to(dtype).to(device),
                value.to(dtype).to(device),
            )
        )
    return steps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_append_stores_outward_rounded_bounds(device, impl, dtype):
    pools = _fp8_pools(device, dtype=dtype)
    # Chunks that start mid-page, a partial last page, then single decode tokens onto it.
    chunks = [(0, 6), (6, 13), (13, 14), (14, 15), (15, 16)]
    steps = _steps([7, 2, 9, 4], chunks, page_size=4, heads=2, head_dim=32, dtype=dtype,
                   device=device, seed=1)  # fmt: skip
    fp8_ref = [t.cpu().clone() for t in pools]
    exact_ref = [t.cpu().clone() for t in pools[:2]] + [t.cpu().to(dtype) for t in pools[2:]]
    actual = [t.clone() for t in pools]
    names = ("k_cache", "v_cache", "key_min", "key_max")
    touched = set()
    for slots, key, value in steps:
        for pool in (fp8_ref, exact_ref):
            append_kv_ref(key=key.cpu(), value=value.cpu(), slot_mapping=slots.cpu(),
                          **dict(zip(names, pool, strict=True)))  # fmt: skip
        plan = plan_append(slot_mapping=slots, page_size=4)
        append_kv(key=key, value=value, slot_mapping=slots, plan=plan, impl=impl,
                  **dict(zip(names, actual, strict=True)))  # fmt: skip
        touched.update((slots.cpu() // 4).tolist())
        # After every step (incremental appends included) the stored bounds are exactly the
        # outward-rounded bounds of the page's keys: no error accumulates.
        pages = torch.tensor(sorted(touched))
        want_min = round_to_float8(exact_ref[2][pages], direction="down")
        want_max = round_to_float8(exact_ref[3][pages], direction="up")
        assert torch.equal(_bits(actual[2][pages.to(device)].cpu()), _bits(want_min))
        assert torch.equal(_bits(actual[3][pages.to(device)].cpu()), _bits(want_max))
    for name, want, got in zip(names, fp8_ref, actual, strict=True):
        assert torch.equal(_bits(want), _bits(got.cpu())), name


def test_append_rejects_mismatched_bounds(device):
    k_cache, v_cache, key_min, key_max = _fp8_pools(device, dtype=torch.bfloat16, pages=3)
    key = torch.randn(2, 2, 32, device=device).bfloat16()
    args = dict(key=key, value=key, k_cache=k_cache, v_cache=v_cache, key_min=key_min,
                key_max=key_max, slot_mapping=torch.tensor([0, 1], device=device))  # fmt: skip
    with pytest.raises(ValueError, match="key_max must have dtype"):
        append_kv(**{**args, "key_max": key_max.bfloat16()})
    with pytest.raises(ValueError, match="key_min has dtype"):
        append_kv(**{**args, "key_min": key_min.half(), "key_max": key_max.half()})


# ----------------------------------------------------------------------------- scores


def _score_inputs(device, *, seqs, qo_heads, kv_heads, head_dim, page_size, num_pages, dtype,
                  seed):  # fmt: skip
    """Random keys appended page by page; bounds in fp8 (and exact, for comparison)."""
    gen = torch.Generator().manual_seed(seed)
    pool = sum(num_pages) + 2
    k_cache = (torch.randn(pool, kv_heads, page_size, head_dim, generator=gen) * 3).to(dtype)
    key_min, key_max = k_cache.float().amin(dim=2), k_cache.float().amax(dim=2)
    table = torch.zeros(seqs, max(num_pages), dtype=torch.int32)
    ids = torch.randperm(pool, generator=gen).int()
    table[:, :] = ids[0]  # padding entries point at a real page, like the engine's tables
    used = 0
    for s, n in enumerate(num_pages):
        table[s, :n] = ids[used : used + n]
        used += n
    query = (torch.randn(seqs, qo_heads, head_dim, generator=gen) * 2).to(dtype)
    args = dict(
        query=query,
        key_min=round_to_float8(key_min, direction="down"),
        key_max=round_to_float8(key_max, direction="up"),
        page_table=table,
        num_pages=torch.tensor(num_pages, dtype=torch.int32),
    )
    exact = dict(args, key_min=key_min.to(dtype), key_max=key_max.to(dtype))
    return {n: t.to(device) for n, t in args.items()}, exact, k_cache


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qo_heads, kv_heads", [(2, 2), (4, 2), (6, 1)], ids=str)
def test_scores_with_fp8_bounds_are_upper_bounds(device, impl, dtype, qo_heads, kv_heads):
    num_pages = [1, 23, 0, 9]
    args, exact, k_cache = _score_inputs(
        device, seqs=4, qo_heads=qo_heads, kv_heads=kv_heads, head_dim=32, page_size=4,
        num_pages=num_pages, dtype=dtype, seed=qo_heads + 10 * kv_heads,
    )  # fmt: skip
    got = page_scores(**args, impl=impl).cpu()
    # (a) The reference on the upcast fp8 bounds.
    upcast = {n: t.cpu() for n, t in args.items()}
    upcast.update(key_min=upcast["key_min"].float(), key_max=upcast["key_max"].float())
    torch.testing.assert_close(got, page_scores_ref(**upcast), rtol=1e-6, atol=1e-5)
    # (b) At least the exact bounds' score, and at least q . k of every key of the page.
    group = qo_heads // kv_heads
    slack = 1e-4
    assert (got >= page_scores_ref(**exact) - slack).all()
    query, table = args["query"].cpu().float(), args["page_table"].cpu().long()
    for s, n in enumerate(num_pages):
        if n == 0:
            assert torch.isinf(got[s]).all()
            continue
        keys = k_cache[table[s, :n]].float()  # [n, num_kv_heads, page_size, head_dim]
        q = query[s].view(kv_heads, group, 1, 1, -1)
        dots = (q * keys.permute(1, 0, 2, 3)[:, None]).sum(-1)  # [Hkv, group, n, page_size]
        true_max = dots.amax(dim=(1, 3))  # [num_kv_heads, n]
        assert (got[s, :, :n] >= true_max - slack).all()


def test_scores_reject_mismatched_bounds(device):
    args, _, _ = _score_inputs(
        device, seqs=1, qo_heads=2, kv_heads=1, head_dim=32, page_size=4, num_pages=[3],
        dtype=torch.bfloat16, seed=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match="key_max must have dtype"):
        page_scores(**{**args, "key_max": args["key_max"].bfloat16()})


def _quest_step(*, query, k_cache, v_cache, key_min, key_max, page_table, seq_lens, top_k,
                impl):  # fmt: skip
    """One Quest decode step through the public launchers, as the engine runs it."""
    num_pages = (seq_lens + k_cache.shape[2] - 1) // k_cache.shape[2]
    scores = page_scores(query=query, key_min=key_min, key_max=key_max, page_table=page_table,
                         num_pages=num_pages, impl=impl)  # fmt: skip
    _, selected = select_pages(scores=scores, num_pages=num_pages, top_k=top_k, impl=impl)
    return paged_decode_attention(query=query, k_cache=k_cache, v_cache=v_cache,
                                  page_table=page_table, seq_lens=seq_lens, selected=selected,
                                  impl=impl)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_quest_step_accepts_fp8_bounds(device, impl):
    """A Quest step with model-dtype pages and fp8 bounds equals the same step over the
    bounds upcast to fp32."""
    gen = torch.Generator().manual_seed(5)
    num_pages, page_size, heads, head_dim = [5, 3], 4, 2, 32
    pool = sum(num_pages) + 1
    k_cache = torch.randn(pool, heads, page_size, head_dim, generator=gen).to(device)
    v_cache = torch.randn(pool, heads, page_size, head_dim, generator=gen).to(device)
    key_min = round_to_float8(k_cache.amin(dim=2), direction="down")
    key_max = round_to_float8(k_cache.amax(dim=2), direction="up")
    table = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 0, 0]], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([19, 10], dtype=torch.int32, device=device)
    query = torch.randn(2, 4, head_dim, generator=gen).to(device)
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table,
                  seq_lens=seq_lens, top_k=2)  # fmt: skip
    out, lse = _quest_step(key_min=key_min, key_max=key_max, impl=impl, **common)
    want_out, want_lse = _quest_step(key_min=key_min.float(), key_max=key_max.float(),
                                     impl="torch", **common)  # fmt: skip
    torch.testing.assert_close(out.cpu(), want_out.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), want_lse.cpu(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qo_heads, kv_heads", [(32, 8), (28, 4), (8, 1)], ids=str)
def test_triton_fp8_bounds_at_engine_sizes_on_gpu(device, dtype, qo_heads, kv_heads):
    """Tensor-core scoring of fp8 bounds (upcast to the query's dtype) and the fp8 append."""
    num_pages = [3000, 1, 1700]
    args, exact, _ = _score_inputs(
        device, seqs=3, qo_heads=qo_heads, kv_heads=kv_heads, head_dim=128, page_size=16,
        num_pages=num_pages, dtype=dtype, seed=kv_heads,
    )  # fmt: skip
    got = page_scores(**args, impl="triton").cpu()
    upcast = {n: t.cpu() for n, t in args.items()}
    upcast.update(key_min=upcast["key_min"].float(), key_max=upcast["key_max"].float())
    torch.testing.assert_close(got, page_scores_ref(**upcast), rtol=1e-5, atol=1e-3)
    assert (got >= page_scores_ref(**exact) - 1e-3).all()

    pools = _fp8_pools(device, dtype=dtype, pages=300, heads=kv_heads, page_size=16,
                       head_dim=128)  # fmt: skip
    chunks = [(0, 1000), (1000, 1531), (1531, 1532), (1532, 1533)]
    steps = _steps(list(range(299, 0, -3)), chunks, page_size=16, heads=kv_heads,
                   head_dim=128, dtype=dtype, device=device, seed=2)  # fmt: skip
    names = ("k_cache", "v_cache", "key_min", "key_max")
    want = [t.cpu().clone() for t in pools]
    for slots, key, value in steps:
        append_kv_ref(key=key.cpu(), value=value.cpu(), slot_mapping=slots.cpu(),
                      **dict(zip(names, want, strict=True)))  # fmt: skip
        append_kv(key=key, value=value, slot_mapping=slots, impl="triton",
                  **dict(zip(names, pools, strict=True)))  # fmt: skip
    for name, a, b in zip(names[2:], want[2:], pools[2:], strict=True):
        assert torch.equal(_bits(a), _bits(b.cpu())), name
