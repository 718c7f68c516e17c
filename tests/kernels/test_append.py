"""append_kv (Triton and PyTorch paths) and plan_append against append_kv_ref."""

import pytest
import torch

from longquest.kernels.append import AppendPlan, append_kv, plan_append, plan_decode_append
from longquest.kernels.ref import append_kv_ref

IMPLS = ("triton", "torch")


def _pool(device, *, pages=12, heads=2, page_size=4, head_dim=32, dtype=torch.float32, seed=0,
          bounds_dtype=None):  # fmt: skip
    """A pool of garbage-filled caches: stale slots must never leak into the bounds.
    The bounds are in ``bounds_dtype`` (None: ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(pages, heads, page_size, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(pages, heads, page_size, head_dim, generator=gen).to(dtype)
    key_min = torch.randn(pages, heads, head_dim, generator=gen).to(bounds_dtype or dtype)
    key_max = torch.randn(pages, heads, head_dim, generator=gen).to(bounds_dtype or dtype)
    return [t.to(device) for t in (k_cache, v_cache, key_min, key_max)]


def _apply(steps, pools, *, impl, use_plan=True):
    """Run ``steps`` ([(slot_mapping, key, value)]) through ref and ``impl`` on copies."""
    expected = [t.cpu().clone() for t in pools]
    actual = [t.clone() for t in pools]
    for slots, key, value in steps:
        append_kv_ref(
            key=key.cpu(),
            value=value.cpu(),
            slot_mapping=slots.cpu(),
            **dict(zip(("k_cache", "v_cache", "key_min", "key_max"), expected, strict=True)),
        )
        plan = plan_append(slot_mapping=slots, page_size=pools[0].shape[2]) if use_plan else None
        append_kv(
            key=key,
            value=value,
            slot_mapping=slots,
            plan=plan,
            impl=impl,
            **dict(zip(("k_cache", "v_cache", "key_min", "key_max"), actual, strict=True)),
        )
    for name, want, got in zip(("k_cache", "v_cache", "key_min", "key_max"), expected, actual):
        assert torch.equal(want.cpu(), got.cpu()), name


def _tokens(count, heads, head_dim, dtype, device, gen):
    key = torch.randn(count, heads, head_dim, generator=gen).to(dtype).to(device)
    value = torch.randn(count, heads, head_dim, generator=gen).to(dtype).to(device)
    return key, value


def _prefill_steps(pages, chunks, *, page_size, heads, head_dim, dtype, device, seed):
    """One sequence on physical ``pages`` (shuffled), prefilled in ``chunks`` of positions."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for start, end in chunks:
        slots = [pages[p // page_size] * page_size + p % page_size for p in range(start, end)]
        key, value = _tokens(end - start, heads, head_dim, dtype, device, gen)
        steps.append((torch.tensor(slots, device=device), key, value))
    return steps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_chunks_start_mid_page(device, impl, dtype):
    pools = _pool(device, dtype=dtype)
    # Chunks start mid-page (6, 13), the last page stays partial, then decode tokens follow.
    chunks = [(0, 6), (6, 13), (13, 14), (14, 15)]
    steps = _prefill_steps(
        [7, 2, 9, 4], chunks, page_size=4, heads=2, head_dim=32, dtype=dtype, device=device, seed=1
    )
    _apply(steps, pools, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_plan", [True, False])
def test_decode_batch_of_ragged_sequences(device, impl, use_plan):
    page_size, heads, head_dim = 4, 2, 32
    pools = _pool(device, page_size=page_size, heads=heads, head_dim=head_dim)
    gen = torch.Generator().manual_seed(2)
    # Sequence lengths 1, 4, 6, 9 before the step: new tokens at offsets 1, 0 (fresh page), 2, 1.
    tables = [[3], [5, 0], [8, 1], [11, 6, 10]]
    lengths = [1, 4, 6, 9]
    steps = []
    for _ in range(2):  # two decode steps in a row
        slots = [t[n // page_size] * page_size + n % page_size for t, n in zip(tables, lengths)]
        key, value = _tokens(len(slots), heads, head_dim, torch.float32, device, gen)
        steps.append((torch.tensor(slots, device=device), key, value))
        lengths = [n + 1 for n in lengths]
    _apply(steps, pools, impl=impl, use_plan=use_plan)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_plan_built_on_device_skips_rows(device, impl):
    """plan_decode_append: rows with page -1 write nothing; the rest equal the reference."""
    page_size, heads, head_dim = 4, 2, 32
    pools = _pool(device, page_size=page_size, heads=heads, head_dim=head_dim)
    gen = torch.Generator().manual_seed(5)
    pages = torch.tensor([3, -1, 8, -1, 6], dtype=torch.int32)
    offsets = torch.tensor([1, 2, 0, 3, 3], dtype=torch.int32)
    key, value = _tokens(5, heads, head_dim, torch.float32, device, gen)
    expected = [t.cpu().clone() for t in pools]
    keep = pages >= 0
    append_kv_ref(
        key=key.cpu()[keep],
        value=value.cpu()[keep],
        slot_mapping=(pages * page_size + offsets)[keep].long(),
        **dict(zip(("k_cache", "v_cache", "key_min", "key_max"), expected, strict=True)),
    )
    page_ids, page_offsets = pages.to(device), offsets.to(device)
    plan = plan_decode_append(page_ids=page_ids, page_offsets=page_offsets, page_size=page_size)
    actual = [t.clone() for t in pools]
    append_kv(
        key=key,
        value=value,
        plan=plan,
        impl=impl,
        **dict(zip(("k_cache", "v_cache", "key_min", "key_max"), actual, strict=True)),
    )
    for name, want, got in zip(("k_cache", "v_cache", "key_min", "key_max"), expected, actual):
        assert torch.equal(want, got.cpu()), name


def test_decode_plan_rejects_bad_arguments():
    ids = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="page_ids"):
        plan_decode_append(page_ids=ids.long(), page_offsets=ids, page_size=4)
    with pytest.raises(ValueError, match="page_offsets"):
        plan_decode_append(page_ids=ids, page_offsets=ids[:2], page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        plan_decode_append(page_ids=ids, page_offsets=ids, page_size=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_dim_64_whole_pages_and_strided_keys(device, impl):
    pools = _pool(device, page_size=8, heads=1, head_dim=64, pages=5)
    gen = torch.Generator().manual_seed(3)
    # key/value as slices of a fused qkv tensor: strided, last dim contiguous.
    qkv = torch.randn(16, 3, 64, generator=gen).to(device)
    slots = torch.tensor([8 * 4 + i for i in range(8)] + [8 * 1 + i for i in range(8)])
    _apply([(slots.to(device), qkv[:, 1:2], qkv[:, 2:3])], pools, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_large_prefill_head_dim_128_on_gpu(device, dtype):
    pages = torch.randperm(300).tolist()
    pools = _pool(device, pages=300, heads=8, page_size=16, head_dim=128, dtype=dtype)
    chunks = [(0, 1000), (1000, 3001), (3001, 3002)]
    steps = _prefill_steps(
        pages, chunks, page_size=16, heads=8, head_dim=128, dtype=dtype, device=device, seed=4
    )
    _apply(steps, pools, impl="triton")


def test_plan_groups_runs():
    # page_size 4: page 2 slots 1-3, page 5 slots 0-1, page 0 slot 3, page 1 slot 0.
    slots = torch.tensor([9, 10, 11, 20, 21, 3, 4])
    plan = plan_append(slot_mapping=slots, page_size=4)
    assert isinstance(plan, AppendPlan)
    assert plan.page_ids.tolist() == [2, 5, 0, 1]
    assert plan.page_offsets.tolist() == [1, 0, 3, 0]
    assert plan.token_starts.tolist() == [0, 3, 5, 6, 7]
    assert (plan.num_runs, plan.num_tokens, plan.max_run_length, plan.max_page_id) == (4, 7, 3, 5)
    assert plan.page_ids.dtype == torch.int32
    empty = plan_append(slot_mapping=torch.tensor([], dtype=torch.int32), page_size=4)
    assert empty.num_runs == 0 and empty.token_starts.tolist() == [0]


@pytest.mark.parametrize(
    "slots, match",
    [
        ([4, 5, 8, 6], "page 1 in separate runs"),  # page 1 split by page 2
        ([5, 4], "page 1 in separate runs"),  # backwards within a page
        ([4, 4], "page 1 in separate runs"),  # the same slot twice
        ([3, -1], "negative slot"),
    ],
)
def test_plan_rejects_racing_or_negative_slots(slots, match):
    with pytest.raises(ValueError, match=match):
        plan_append(slot_mapping=torch.tensor(slots), page_size=4)


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="slot_mapping"):
        plan_append(slot_mapping=torch.tensor([[1, 2]]), page_size=4)
    with pytest.raises(ValueError, match="slot_mapping"):
        plan_append(slot_mapping=torch.tensor([1.0]), page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        plan_append(slot_mapping=torch.tensor([1]), page_size=0)


def _good(device):
    k_cache, v_cache, key_min, key_max = _pool(device, pages=3)
    key = torch.randn(2, 2, 32, device=device)
    return dict(
        key=key,
        value=key.clone(),
        k_cache=k_cache,
        v_cache=v_cache,
        key_min=key_min,
        key_max=key_max,
        slot_mapping=torch.tensor([0, 1], device=device),
    )


def _plan_for_page_size_8(a):
    return dict(plan=plan_append(slot_mapping=a["slot_mapping"], page_size=8))


BAD = {
    "key rank": (lambda a: dict(key=a["key"][0]), "key must have 3 dimensions"),
    "value dtype": (lambda a: dict(value=a["value"].half()), "value has dtype"),
    "key heads": (lambda a: dict(key=a["key"].repeat(1, 2, 1)), r"key.shape\[1\] \(num_kv_heads"),
    "key head_dim": (lambda a: dict(key=a["key"][..., :16]), r"key.shape\[2\] \(head_dim\)"),
    "value tokens": (lambda a: dict(value=a["value"][:1]), r"value.shape\[0\] \(num_tokens\)"),
    "k_cache rank": (lambda a: dict(k_cache=a["k_cache"][0]), "k_cache must have 4 dimensions"),
    "k_cache dtype": (lambda a: dict(k_cache=a["k_cache"].int()), "k_cache must have dtype"),
    "key_min dtype": (lambda a: dict(key_min=a["key_min"].half()), "key_min has dtype"),
    "key_max heads": (lambda a: dict(key_max=a["key_max"][:, :1]), r"key_max.shape\[1\]"),
    "v_cache pages": (lambda a: dict(v_cache=a["v_cache"][:2]), r"v_cache.shape\[0\]"),
    "device": (lambda a: dict(value=a["value"].to("meta")), "value is on meta"),
    "slot range": (lambda a: dict(slot_mapping=a["slot_mapping"] + 12), "slot_mapping points"),
    "slot length": (lambda a: dict(slot_mapping=a["slot_mapping"][:1]), r"slot_mapping.shape"),
    "slot dtype": (lambda a: dict(slot_mapping=a["slot_mapping"].float()), "slot_mapping must"),
    "no slots": (lambda a: dict(slot_mapping=None), "needs slot_mapping or plan"),
    "stale plan": (_plan_for_page_size_8, "rebuild it with plan_append"),
    "plan type": (lambda a: dict(plan="plan"), "plan must be an AppendPlan"),
    "impl": (lambda a: dict(impl="cuda"), "impl must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_argument(device, case):
    good = _good(device)
    change, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        append_kv(**{**good, **change(good)})
