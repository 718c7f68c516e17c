"""prefill_attention (Triton and PyTorch paths) against prefill_attention_ref."""

import dataclasses
import math

import pytest
import torch

from longquest.kernels import DEFAULT_TUNING
from longquest.kernels.prefill import _prefill_torch, _prefill_triton, prefill_attention
from longquest.kernels.ref import prefill_attention_ref

# Every chunk through cuDNN where it runs, however short.
CUDNN_ALWAYS = dataclasses.replace(DEFAULT_TUNING, prefill_cudnn_min_queries=1)

IMPLS = ["torch", "triton"]
# (num_qo_heads, num_kv_heads): GQA ratios 1, 2, 3, 4, 8 and MQA.
HEADS = [(2, 2), (4, 2), (3, 1), (8, 2), (8, 1), (4, 1)]
# (num_q, num_k, query_start): a whole prompt, later chunks, one decode-like query; the
# CPU tile is 32 x 16, so 45 and 37 queries leave partial blocks.
CHUNKS = [(45, 45, 0), (37, 100, 63), (1, 20, 19), (20, 70, 30)]


def assert_matches(out, lse, ref_out, ref_lse, *, atol=1e-5, rtol=1e-3):
    assert out.dtype == ref_out.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse))
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=atol, rtol=rtol)
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], atol=atol, rtol=rtol)


def random_inputs(gen, num_q, num_k, heads, head_dim, dtype=torch.float32):
    num_qo_heads, num_kv_heads = heads
    query = torch.randn(num_q, num_qo_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_k, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_k, num_kv_heads, head_dim, generator=gen).to(dtype)
    return query, key, value


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", CHUNKS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_ref(impl, chunk, causal, device):
    num_q, num_k, query_start = chunk
    gen = torch.Generator().manual_seed(num_q * 1000 + num_k + causal)
    query, key, value = random_inputs(gen, num_q, num_k, (4, 2), 32)
    ref_out, ref_lse = prefill_attention_ref(
        query=query, key=key, value=value, query_start=query_start, causal=causal
    )
    out, lse = prefill_attention(
        query=query.to(device), key=key.to(device), value=value.to(device),
        query_start=query_start, causal=causal, impl=impl,
    )  # fmt: skip
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [32, 64])
def test_gqa_ratios_and_head_dims(impl, heads, head_dim, device):
    gen = torch.Generator().manual_seed(head_dim * 100 + heads[0] * 10 + heads[1])
    query, key, value = random_inputs(gen, 33, 50, heads, head_dim)
    ref_out, ref_lse = prefill_attention_ref(query=query, key=key, value=value, query_start=17)
    out, lse = prefill_attention(
        query=query.to(device), key=key.to(device), value=value.to(device),
        query_start=17, impl=impl,
    )  # fmt: skip
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
def test_explicit_scale(impl, device):
    gen = torch.Generator().manual_seed(11)
    query, key, value = random_inputs(gen, 9, 9, (2, 1), 32)
    ref_out, ref_lse = prefill_attention_ref(
        query=query, key=key, value=value, query_start=0, scale=0.3
    )
    out, lse = prefill_attention(
        query=query.to(device), key=key.to(device), value=value.to(device),
        query_start=0, scale=0.3, impl=impl,
    )  # fmt: skip
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl, device):
    """Slices of fused projections (non-contiguous heads) are read in place."""
    gen = torch.Generator().manual_seed(15)
    qkv = torch.randn(40, 8, 32, generator=gen)  # 4 query heads, then 2 key and 2 value heads
    query, key, value = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    ref_out, ref_lse = prefill_attention_ref(query=query, key=key, value=value, query_start=0)
    qkv = qkv.to(device)
    out, lse = prefill_attention(
        query=qkv[:, :4], key=qkv[:, 4:6], value=qkv[:, 6:], query_start=0, impl=impl
    )
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_no_keys_gives_zero_and_minus_inf(impl, causal, device):
    query = torch.randn(5, 2, 32, device=device)
    key = torch.randn(0, 1, 32, device=device)
    out, lse = prefill_attention(
        query=query, key=key, value=key, query_start=0, causal=causal, impl=impl
    )
    assert (out == 0).all() and (lse == -math.inf).all()


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_blocks_bound_memory(causal):
    """Small query and key blocks (partial ones included) match the unblocked answer."""
    gen = torch.Generator().manual_seed(12)
    query, key, value = random_inputs(gen, 23, 60, (6, 2), 32)
    ref_out, ref_lse = prefill_attention_ref(
        query=query, key=key, value=value, query_start=37, causal=causal
    )
    # max_logits = num_qo_heads * block_k * 4 -> blocks of 4 queries and 7 keys.
    out, lse = _prefill_torch(query, key, value, 37, causal, 32**-0.5, block_k=7, max_logits=168)
    assert_matches(out, lse, ref_out, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_dtypes(dtype, head_dim, causal, device):
    gen = torch.Generator().manual_seed(13)
    query, key, value = random_inputs(gen, 300, 1000, (32, 8), head_dim, dtype)
    ref_out, ref_lse = prefill_attention_ref(
        query=query.float(), key=key.float(), value=value.float(), query_start=700, causal=causal
    )
    out, lse = prefill_attention(
        query=query.to(device), key=key.to(device), value=value.to(device),
        query_start=700, causal=causal, tuning=CUDNN_ALWAYS,
    )  # fmt: skip
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_matches(out, lse, ref_out.to(dtype), ref_lse, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("chunk", [*CHUNKS, (16, 10, 30), (64, 64, 0)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_half_precision_shapes(heads, chunk, causal, device):
    """bf16 through the GPU path (cuDNN's split where it runs) and through the Triton
    kernel itself, for every GQA ratio, chunks after keys, before them and past them."""
    num_q, num_k, query_start = chunk
    gen = torch.Generator().manual_seed(num_q + num_k + heads[0])
    query, key, value = random_inputs(gen, num_q, num_k, heads, 64, torch.bfloat16)
    ref_out, ref_lse = prefill_attention_ref(
        query=query.float(), key=key.float(), value=value.float(), query_start=query_start,
        causal=causal,
    )  # fmt: skip
    query, key, value = query.to(device), key.to(device), value.to(device)
    out, lse = prefill_attention(
        query=query, key=key, value=value, query_start=query_start, causal=causal,
        tuning=CUDNN_ALWAYS,
    )  # fmt: skip
    assert_matches(out, lse, ref_out.to(torch.bfloat16), ref_lse, atol=2e-2)
    out, lse = _prefill_triton(query, key, value, query_start, causal, 64**-0.5)
    assert_matches(out, lse, ref_out.to(torch.bfloat16), ref_lse, atol=2e-2)


def _valid_inputs():
    return dict(
        query=torch.randn(4, 4, 32),
        key=torch.randn(6, 2, 32),
        value=torch.randn(6, 2, 32),
        query_start=2,
    )


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"query": torch.randn(4, 32)}, "query"),
        ({"query": torch.zeros(4, 4, 32, dtype=torch.int64)}, "query"),
        ({"key": torch.randn(6, 2, 32, device="meta")}, "key"),
        ({"query": torch.randn(4, 3, 32)}, "heads"),
        ({"query": torch.randn(4, 4, 64)}, "key"),
        ({"value": torch.randn(6, 2, 16)}, "value"),
        ({"value": torch.randn(6, 2, 32, dtype=torch.float16)}, "value"),
        ({"query_start": -1}, "query_start"),
        ({"query_start": 1.5}, "query_start"),
        ({"impl": "cpu"}, "impl"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, name):
    with pytest.raises(ValueError, match=name):
        prefill_attention(**(_valid_inputs() | change))
