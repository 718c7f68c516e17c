"""paged_decode_attention (Triton and PyTorch paths) against paged_decode_attention_ref."""

import math

import pytest
import torch

from longquest.kernels.decode import paged_decode_attention
from longquest.kernels.decode_torch import decode_torch
from longquest.kernels.ref import paged_decode_attention_ref

IMPLS = ["torch", "triton"]
# (num_qo_heads, num_kv_heads): GQA ratios 1, 2, 3, 4, 8 and MQA.
HEADS = [(4, 4), (4, 2), (6, 2), (8, 2), (16, 2), (4, 1)]


def make_cache(gen, *, seq_lens, num_kv_heads, page_size, head_dim, dtype, device, spare=5):
    """A page pool with each sequence's pages scattered at random physical ids.

    Table entries past a sequence's last page hold ids outside the pool: they must be
    ignored.
    """
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pages = [-(-n // page_size) for n in seq_lens]
    width = max(max(pages), 1) + 1
    total = sum(pages) + spare
    shape = (total, num_kv_heads, page_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    ids = torch.randperm(total, generator=gen)
    table = torch.full((len(seq_lens), width), total + 7, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        table[s, :n] = ids[used : used + n]
        used += n
    return k_cache.to(device), v_cache.to(device), table.to(device), lens.to(device)


def random_selection(gen, *, seq_lens, num_kv_heads, page_size, top_k, device):
    """Sorted random subsets of each sequence's pages, padded with -1 at the end."""
    selected = torch.full((len(seq_lens), num_kv_heads, top_k), -1, dtype=torch.int32)
    for s, n in enumerate(seq_lens):
        pages = -(-n // page_size)
        for h in range(num_kv_heads):
            count = int(torch.randint(0, min(top_k, pages) + 1, (1,), generator=gen))
            pick = torch.randperm(pages, generator=gen)[:count].sort().values
            selected[s, h, :count] = pick.int()
    return selected.to(device)


def assert_matches(out, lse, ref_out, ref_lse, *, atol, rtol=1e-3):
    assert out.dtype == ref_out.dtype and lse.dtype == torch.float32
    out, lse, ref_out, ref_lse = out.cpu(), lse.cpu(), ref_out.cpu(), ref_lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), atol=atol, rtol=rtol)
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[finite].cpu(), ref_lse[finite].cpu(), atol=atol, rtol=rtol)


def run_both(*, impl, device, atol=1e-5, **inputs):
    ref_inputs = {
        k: v.cpu().float() if v.is_floating_point() else v.cpu()
        for k, v in inputs.items()
        if v is not None
    }
    ref_out, ref_lse = paged_decode_attention_ref(**ref_inputs)
    out, lse = paged_decode_attention(**inputs, impl=impl)
    assert_matches(out, lse, ref_out.to(out.dtype), ref_lse, atol=atol)
    return out, lse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [32, 64])
def test_matches_ref_dense_and_selected(impl, heads, head_dim, device):
    num_qo_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(head_dim * 100 + num_qo_heads * 10 + num_kv_heads)
    seq_lens = [37, 64, 5]  # partial last page, exact pages, a single partial page
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=num_kv_heads, page_size=16, head_dim=head_dim,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(len(seq_lens), num_qo_heads, head_dim, generator=gen).to(device)
    selected = random_selection(
        gen, seq_lens=seq_lens, num_kv_heads=num_kv_heads, page_size=16, top_k=3, device=device
    )
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)
    run_both(impl=impl, device=device, **common, selected=None)
    run_both(impl=impl, device=device, **common, selected=selected)


@pytest.mark.parametrize("impl", IMPLS)
def test_edges_one_page_ragged_and_empty_sequence(impl, device):
    gen = torch.Generator().manual_seed(1)
    seq_lens = [1, 16, 17, 0, 45, 8]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(len(seq_lens), 4, 32, generator=gen).to(device)
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)
    out, lse = run_both(impl=impl, device=device, **common)
    assert torch.isinf(lse[3]).all() and (out[3] == 0).all()
    # Selection listing pages in any order, -1 in the middle and indices past the
    # sequence's last page (which are ignored, like -1).
    rows = [[0, -1, 3], [-1, 0, -1], [1, 0, 2], [0, 1, -1], [2, -1, 0], [5, 0, 9]]
    selected = torch.tensor(rows, dtype=torch.int32)[:, None].expand(-1, 2, -1).contiguous()
    run_both(impl=impl, device=device, **common, selected=selected.to(device))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [0, 4])
def test_empty_selection_gives_zero_and_minus_inf(impl, top_k, device):
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=[40, 3], num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(2, 6, 32, generator=gen).to(device)
    selected = torch.full((2, 2, top_k), -1, dtype=torch.int32, device=device)
    out, lse = paged_decode_attention(
        query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens,
        selected=selected, impl=impl, num_splits=None if impl == "torch" else 2,
    )  # fmt: skip
    assert (out == 0).all() and not out.isnan().any()
    assert (lse == -math.inf).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_selecting_every_page_equals_dense(impl, device):
    gen = torch.Generator().manual_seed(3)
    seq_lens = [50, 20]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(2, 4, 32, generator=gen).to(device)
    every = torch.tensor([[0, 1, 2, 3], [0, 1, -1, -1]], dtype=torch.int32)
    selected = every[:, None].expand(2, 2, 4).contiguous().to(device)
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)
    dense = paged_decode_attention(**common, impl=impl)
    sparse = paged_decode_attention(**common, selected=selected, impl=impl)
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("page_size", [4, 16, 64])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 12])
def test_triton_split_counts_and_page_sizes(page_size, num_splits, device):
    """More splits than pages leaves splits empty: they must merge away cleanly."""
    gen = torch.Generator().manual_seed(page_size * 100 + num_splits)
    seq_lens = [7 * page_size + 1, 2 * page_size]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=page_size, head_dim=32,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(2, 4, 32, generator=gen).to(device)
    selected = random_selection(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=page_size, top_k=6, device=device
    )
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)
    for sel in (None, selected):
        ref_out, ref_lse = paged_decode_attention_ref(
            **{k: v.cpu() for k, v in common.items()}, selected=None if sel is None else sel.cpu()
        )
        out, lse = paged_decode_attention(
            **common, selected=sel, impl="triton", num_splits=num_splits
        )
        assert_matches(out, lse, ref_out, ref_lse, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_into_buffers_with_split_counters(impl, device):
    """out / lse written into views of one packed fp32 buffer (lse strided), the splits
    reduced by the last of them through counters that are left zeroed."""
    gen = torch.Generator().manual_seed(11)
    seq_lens = [70, 33, 0]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(len(seq_lens), 4, 32, generator=gen).to(device)
    # The selection at the front of a longer list, as a rank's share of a global top-k.
    selected = torch.full((3, 2, 8), -1, dtype=torch.int32)
    selected[0, :, :3] = torch.tensor([0, 2, 4], dtype=torch.int32)
    selected[1, 0, :1] = 1
    selected = selected.to(device)
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table,
                  seq_lens=lens, selected=selected)  # fmt: skip
    want_out, want_lse = paged_decode_attention(**common, impl=impl)
    packed = torch.full((3, 4, 33), 7.0, device=device)
    counters = torch.zeros(3 * 2 + 1, dtype=torch.int32, device=device)
    # 3 and 32 splits leave some idle (32: two merge chunks).
    for splits, use_counters in ((None, True), (1, True), (3, True), (32, True), (3, False)):
        packed.fill_(7.0)
        out, lse = paged_decode_attention(
            **common, impl=impl, num_splits=splits,
            split_counters=counters if use_counters else None,  # False: a merge kernel
            out=packed[..., :32], lse=packed[..., 32],
        )  # fmt: skip
        assert out.data_ptr() == packed.data_ptr() and lse.data_ptr() == packed[..., 32].data_ptr()
        assert_matches(out, lse, want_out, want_lse, atol=1e-5)
        assert torch.equal(counters.cpu(), torch.zeros(7, dtype=torch.int32))
    with pytest.raises(ValueError, match="split_counters holds 5"):
        paged_decode_attention(**common, split_counters=counters[:5])
    with pytest.raises(ValueError, match="split_counters must be contiguous"):
        strided = torch.zeros(14, dtype=torch.int32, device=device)[::2]
        paged_decode_attention(**common, split_counters=strided)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        paged_decode_attention(**common, out=torch.empty(3, 4, 64, device=device)[..., ::2])


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl, device):
    """Views (a query slice, a shared selection expanded over KV heads) need no copies."""
    gen = torch.Generator().manual_seed(14)
    seq_lens = [50, 21]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    query = torch.randn(2, 4, 96, generator=gen).to(device)[:, :, 32:64]
    selected = torch.tensor([[2, 0, -1], [1, -1, 0]], dtype=torch.int32, device=device)
    selected = selected[:, None].expand(2, 2, 3)  # stride 0 over KV heads
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)
    run_both(impl=impl, device=device, **common, selected=selected)


def test_torch_path_chunks_bound_memory():
    """Tiny chunks (one page per step) give the same answer as one big chunk."""
    gen = torch.Generator().manual_seed(4)
    seq_lens = [70, 33, 0]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    query = torch.randn(3, 4, 32, generator=gen)
    ref_out, ref_lse = paged_decode_attention_ref(
        query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens
    )
    out, lse = decode_torch(query, k_cache, v_cache, table, lens, None, 32**-0.5, block_elements=1)
    assert_matches(out, lse, ref_out, ref_lse, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (16, 1), (8, 8)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_dtypes(dtype, heads, head_dim, device):
    gen = torch.Generator().manual_seed(5)
    num_qo_heads, num_kv_heads = heads
    seq_lens = [1500, 1, 333, 0, 900]
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=seq_lens, num_kv_heads=num_kv_heads, page_size=16, head_dim=head_dim,
        dtype=dtype, device=device,
    )  # fmt: skip
    query = torch.randn(len(seq_lens), num_qo_heads, head_dim, generator=gen).to(dtype).to(device)
    selected = random_selection(
        gen, seq_lens=seq_lens, num_kv_heads=num_kv_heads, page_size=16, top_k=64, device=device
    )
    common = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)
    for sel in (None, selected):
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        run_both(impl="triton", device=device, atol=atol, **common, selected=sel)


def _valid_inputs():
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, table, lens = make_cache(
        gen, seq_lens=[20, 9], num_kv_heads=2, page_size=16, head_dim=32,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    query = torch.randn(2, 4, 32, generator=gen)
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=table, seq_lens=lens)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"query": torch.randn(2, 4, 32, 1)}, "query"),
        ({"query": torch.zeros(2, 4, 32, dtype=torch.int32)}, "query"),
        ({"k_cache": torch.randn(10, 2, 16, 32, device="meta")}, "k_cache"),
        ({"query": torch.randn(2, 3, 32)}, "heads"),
        ({"query": torch.randn(2, 4, 64)}, "k_cache"),
        ({"v_cache": torch.randn(10, 2, 16, 32, dtype=torch.float16)}, "v_cache"),
        ({"page_table": torch.zeros(2, 3)}, "page_table"),
        ({"page_table": torch.tensor([[0, 99], [1, 0]], dtype=torch.int32)}, "page_table"),
        ({"seq_lens": torch.tensor([20, 9, 1], dtype=torch.int32)}, "seq_lens"),
        ({"seq_lens": torch.tensor([20, 999], dtype=torch.int32)}, "seq_lens"),
        ({"selected": torch.zeros(2, 3, 4, dtype=torch.int32)}, "selected"),
        ({"selected": torch.zeros(2, 2, 4)}, "selected"),
        ({"num_splits": 0}, "num_splits"),
        ({"impl": "cuda"}, "impl"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, name):
    inputs = _valid_inputs() | change
    with pytest.raises(ValueError, match=name):
        paged_decode_attention(**inputs)


def test_check_pages_false_skips_the_pool_check():
    inputs = _valid_inputs()
    inputs["page_table"] = inputs["page_table"].clone()
    inputs["page_table"][0, 5:] = -3  # past the last page: never read
    paged_decode_attention(**inputs, check_pages=False)
    paged_decode_attention(**inputs)
