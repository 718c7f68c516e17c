"""merge_attention_states (Triton and PyTorch paths) against merge_attention_states_ref."""

import math

import pytest
import torch

from longquest.kernels.merge import merge_attention_states
from longquest.kernels.ref import merge_attention_states_ref, prefill_attention_ref

IMPLS = ["torch", "triton"]


def random_states(gen, num_sources, num_seqs=3, num_heads=4, head_dim=32, dtype=torch.float32):
    outputs = torch.randn(num_sources, num_seqs, num_heads, head_dim, generator=gen).to(dtype)
    lses = torch.randn(num_sources, num_seqs, num_heads, generator=gen) * 5
    return outputs, lses


def assert_matches(out, lse, ref_out, ref_lse, *, atol=1e-5):
    assert out.dtype == ref_out.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse))
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=atol, rtol=1e-3)
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_sources", [1, 2, 3, 4])
def test_matches_ref_with_empty_sources(impl, num_sources, device):
    gen = torch.Generator().manual_seed(num_sources)
    outputs, lses = random_states(gen, num_sources)
    # Empty sources: one whole source (when there are several), one (seq, head) row in
    # every source (all empty), one row in all but the last source.
    if num_sources > 1:
        lses[0] = -math.inf
        outputs[0] = 0
    lses[:, 1, 2] = -math.inf
    outputs[:, 1, 2] = 0
    lses[:-1, 2, 0] = -math.inf
    outputs[:-1, 2, 0] = 0
    ref_out, ref_lse = merge_attention_states_ref(outputs=outputs, lses=lses)
    out, lse = merge_attention_states(outputs=outputs.to(device), lses=lses.to(device), impl=impl)
    assert_matches(out, lse, ref_out, ref_lse)
    assert (out[1, 2] == 0).all() and lse[1, 2] == -math.inf


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sources_are_not_read(impl, device):
    """Garbage (NaN) left in an empty source's output must not leak into the result."""
    gen = torch.Generator().manual_seed(7)
    outputs, lses = random_states(gen, 3)
    lses[1] = -math.inf
    lses[:, 0, 0] = -math.inf
    clean = outputs.clone()
    clean[1] = 0
    clean[:, 0, 0] = 0
    outputs[1] = math.nan
    outputs[:, 0, 0] = math.nan
    ref_out, ref_lse = merge_attention_states_ref(outputs=clean, lses=lses)
    out, lse = merge_attention_states(outputs=outputs.to(device), lses=lses.to(device), impl=impl)
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_sources(impl, device):
    """More sources than the kernel's chunk of sources (the split-K reduction case)."""
    gen = torch.Generator().manual_seed(8)
    outputs, lses = random_states(gen, 37, num_seqs=2, num_heads=2)
    lses[5:30] = -math.inf
    ref_out, ref_lse = merge_attention_states_ref(outputs=outputs, lses=lses)
    out, lse = merge_attention_states(outputs=outputs.to(device), lses=lses.to(device), impl=impl)
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
def test_merging_key_partitions_gives_full_attention(impl, device):
    """Attention over disjoint key sets, merged, equals attention over their union."""
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(5, 4, 32, generator=gen)
    key = torch.randn(30, 2, 32, generator=gen)
    value = torch.randn(30, 2, 32, generator=gen)
    full_out, full_lse = prefill_attention_ref(
        query=query, key=key, value=value, query_start=0, causal=False
    )
    bounds = [(0, 0), (0, 7), (7, 8), (8, 30)]  # one partition is empty
    parts = [
        prefill_attention_ref(
            query=query, key=key[a:b], value=value[a:b], query_start=0, causal=False
        )
        for a, b in bounds
    ]
    outputs = torch.stack([p[0] for p in parts]).to(device)
    lses = torch.stack([p[1] for p in parts]).to(device)
    out, lse = merge_attention_states(outputs=outputs, lses=lses, impl=impl)
    assert_matches(out, lse, full_out, full_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision(dtype, device):
    gen = torch.Generator().manual_seed(10)
    outputs, lses = random_states(gen, 4, num_seqs=16, num_heads=32, head_dim=128, dtype=dtype)
    lses[2, :4] = -math.inf
    lses[:, 5] = -math.inf
    ref_out, ref_lse = merge_attention_states_ref(outputs=outputs.float(), lses=lses)
    out, lse = merge_attention_states(outputs=outputs.to(device), lses=lses.to(device))
    assert out.dtype == dtype
    assert_matches(out, lse, ref_out.to(dtype), ref_lse, atol=1e-2)


@pytest.mark.parametrize(
    ("outputs", "lses", "name"),
    [
        (torch.randn(2, 3, 4), torch.zeros(2, 3, 4), "outputs"),
        (torch.zeros(2, 3, 4, 8, dtype=torch.int32), torch.zeros(2, 3, 4), "outputs"),
        (torch.randn(2, 3, 4, 8), torch.zeros(2, 3), "lses"),
        (torch.randn(2, 3, 4, 8), torch.zeros(3, 3, 4), "lses"),
        (torch.randn(2, 3, 4, 8), torch.zeros(2, 3, 5), "lses"),
        (torch.randn(2, 3, 4, 8), torch.zeros(2, 3, 4, device="meta"), "lses"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(outputs, lses, name):
    with pytest.raises(ValueError, match=name):
        merge_attention_states(outputs=outputs, lses=lses)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_dtype_rounds_once(impl, device):
    gen = torch.Generator().manual_seed(3)
    outputs, lses = random_states(gen, 3)
    want, want_lse = merge_attention_states_ref(outputs=outputs, lses=lses)
    outputs, lses = outputs.to(device), lses.to(device)
    out, lse = merge_attention_states(outputs=outputs, lses=lses, impl=impl,
                                      out_dtype=torch.bfloat16)  # fmt: skip
    full, _ = merge_attention_states(outputs=outputs, lses=lses, impl=impl)
    assert out.dtype == torch.bfloat16 and full.dtype == torch.float32
    if impl == "torch" or device.type == "cuda":  # the interpreter truncates to bf16
        assert torch.equal(out, full.to(torch.bfloat16))  # the fp32 result, rounded once
    torch.testing.assert_close(out.cpu().float(), want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out_dtype"):
        merge_attention_states(outputs=outputs, lses=lses, out_dtype=torch.int32)
