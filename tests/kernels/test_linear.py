"""linear (Triton and F.linear paths) against linear_ref."""

import pytest
import torch
import torch.nn.functional as F

from longquest.kernels import linear as linear_module
from longquest.kernels.linear import MAX_ROWS, linear
from longquest.kernels.ref import linear_ref


def make(gen, rows, n, k, *, dtype=torch.float32, device="cpu", bias=False, row_stride=None):
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    # A slice of a wider matrix, as the split MLP's down projection is.
    full = torch.randn(n, row_stride or k, generator=gen).to(dtype).to(device)
    weight = full[:, :k]
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, weight, b


@pytest.mark.parametrize(
    "rows, n, k, bias, row_stride",
    [
        (1, 64, 256, False, None),
        (3, 40, 200, True, None),  # neither dimension a multiple of the tile
        (8, 96, 512, False, 768),  # a column slice of a wider matrix
        (MAX_ROWS, 33, 256, True, None),
    ],
)
def test_triton_matches_ref(rows, n, k, bias, row_stride, device):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x, weight, b = make(gen, rows, n, k, device=device, bias=bias, row_stride=row_stride)
    out = linear(x=x, weight=weight, bias=b, impl="triton")
    assert out.shape == (rows, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), linear_ref(x=x, weight=weight, bias=b).cpu(),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_empty_and_zero_width(device):
    gen = torch.Generator().manual_seed(1)
    x, weight, b = make(gen, 0, 8, 16, device=device, bias=True)
    assert linear(x=x, weight=weight, bias=b, impl="triton").shape == (0, 8)
    x, weight, b = make(gen, 2, 8, 0, device=device, bias=True)
    out = linear(x=x, weight=weight, bias=b, impl="triton")
    torch.testing.assert_close(out.cpu(), b.expand(2, 8).cpu())


def test_falls_back_to_f_linear(monkeypatch):
    """More rows than the kernel takes, a strided last dimension, or the CPU by default:
    F.linear, exactly."""
    gen = torch.Generator().manual_seed(2)
    launched = []
    monkeypatch.setattr(linear_module, "_linear_triton", lambda *a: launched.append(a))
    for rows, weight_t in ((MAX_ROWS + 1, False), (2, True)):
        x, weight, b = make(gen, rows, 24, 32, bias=True)
        if weight_t:
            weight = weight.T.contiguous().T  # same values, last stride != 1
        out = linear(x=x, weight=weight, bias=b, impl="triton")
        assert torch.equal(out, F.linear(x, weight, b))
    x, weight, b = make(gen, 2, 24, 32)
    assert torch.equal(linear(x=x, weight=weight), F.linear(x, weight))
    assert not launched


def test_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="in_features"):
        linear(x=x, weight=torch.randn(4, 9))
    with pytest.raises(ValueError, match="dtype"):
        linear(x=x, weight=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out_features"):
        linear(x=x, weight=torch.randn(4, 8), bias=torch.randn(5))
    with pytest.raises(ValueError, match="dimensions"):
        linear(x=torch.randn(8), weight=torch.randn(4, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, MAX_ROWS])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 7168), (300, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_cublas(rows, n, k, dtype):
    gen = torch.Generator().manual_seed(rows + n)
    x, weight, b = make(gen, rows, n, k, dtype=dtype, device="cuda", row_stride=2 * k)
    out = linear(x=x, weight=weight)  # impl None: Triton on CUDA at these rows
    ref = linear_ref(x=x, weight=weight)
    # Both accumulate in fp32; the outputs differ by the final rounding at most.
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), F.linear(x, weight).float(), atol=1e-2, rtol=1e-2)
