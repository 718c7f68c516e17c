"""rms_norm and rotate_query_key: Triton against the PyTorch reference path."""

import pytest
import torch

from longquest.engine.rope import rope_cos_sin, rope_inv_freq, rotate
from longquest.kernels.norm_rope import add_rms_norm, rms_norm, rotate_query_key, silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [64, 96])
def test_rms_norm_matches_reference(device, dtype, size):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(5, 3, size, generator=gen).to(dtype).to(device)
    weight = torch.randn(size, generator=gen).to(dtype).to(device)
    want = rms_norm(x=x.cpu(), weight=weight.cpu(), eps=1e-5, impl="torch")
    got = rms_norm(x=x, weight=weight, eps=1e-5, impl="triton").cpu()
    # bf16: the rounding of a different summation order may move a value by an ulp or two.
    tol = 1e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # A strided view (a slice of a fused projection) gives the same result.
    wide = torch.randn(5, 2 * size, generator=gen).to(dtype).to(device)
    torch.testing.assert_close(
        rms_norm(x=wide[:, :size], weight=weight, eps=1e-5, impl="triton").cpu(),
        rms_norm(x=wide[:, :size].cpu(), weight=weight.cpu(), eps=1e-5, impl="torch"),
        rtol=tol,
        atol=tol,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_query_key_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, hq, hkv, head_dim = 7, 6, 2, 32
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype).to(device)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    positions = torch.tensor([0, 1, 5, 17, 300, 4096, 70000], device=device)
    inv_freq = rope_inv_freq(head_dim=head_dim, rope_theta=10000.0, rope_scaling=None).to(device)
    cos, sin = rope_cos_sin(positions=positions, inv_freq=inv_freq)
    got_q, got_k = rotate_query_key(query=q, key=k, cos=cos[:, 0], sin=sin[:, 0], impl="triton")
    want_q, want_k = rotate(q, cos=cos, sin=sin), rotate(k, cos=cos, sin=sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_q.cpu(), want_q.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.cpu(), want_k.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 80, generator=gen).to(dtype).to(device)
    residual = torch.randn(3, 80, generator=gen).to(dtype).to(device)
    weight = torch.randn(80, generator=gen).to(dtype).to(device)
    want_sum, want = add_rms_norm(
        x=x.cpu(), residual=residual.cpu(), weight=weight.cpu(), eps=1e-6, impl="torch"
    )
    got_sum, got = add_rms_norm(x=x, residual=residual, weight=weight, eps=1e-6, impl="triton")
    tol = 1e-6 if dtype == torch.float32 else 1.6e-2
    # (The CPU interpreter's bf16 cast may truncate where the GPU rounds: one ulp.)
    torch.testing.assert_close(got_sum.cpu(), want_sum, rtol=tol / 2, atol=0)
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    gate_up = torch.randn(3, 2 * 1100, generator=gen).to(dtype).to(device)
    torch.testing.assert_close(
        silu_mul(gate_up=gate_up, impl="triton").cpu(),
        silu_mul(gate_up=gate_up.cpu(), impl="torch"),
        rtol=tol,
        atol=tol,
    )


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x=torch.zeros(2, 8), residual=torch.zeros(3, 8), weight=torch.zeros(8), eps=1)
    with pytest.raises(ValueError, match="even"):
        silu_mul(gate_up=torch.zeros(2, 7))
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x=x, weight=torch.zeros(4), eps=1e-5)
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="cos"):
        rotate_query_key(query=q, key=k, cos=torch.zeros(2, 3), sin=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="key"):
        rotate_query_key(query=q, key=torch.zeros(3, 2, 8), cos=torch.zeros(2, 4), sin=x[:, :4])
