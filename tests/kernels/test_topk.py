"""select_pages (Triton and PyTorch paths) against select_pages_ref, exactly."""

import math
from dataclasses import replace

import pytest
import torch

from longquest.kernels import DEFAULT_TUNING
from longquest.kernels.ref import select_pages_ref
from longquest.kernels.topk import _select_pages_triton, select_pages

IMPLS = ("triton", "torch")


def _scores(device, *, num_pages, heads=2, width=None, ties=False, seed=0):
    """Random fp32 scores, ``-inf`` past each row's pages as page_scores leaves them."""
    gen = torch.Generator().manual_seed(seed)
    width = max(num_pages) if width is None else width
    shape = (len(num_pages), heads, width)
    if ties:  # a handful of distinct values: many ties, including at the threshold
        scores = torch.randint(-2, 3, shape, generator=gen).float()
    else:
        scores = torch.randn(shape, generator=gen)
    for s, n in enumerate(num_pages):
        scores[s, :, n:] = -math.inf
    return scores.to(device), torch.tensor(num_pages, dtype=torch.int32, device=device)


def _check(scores, num_pages, top_k, pin_last, *, impl=None, chunk=None, **sizes):
    want_scores, want_indices = select_pages_ref(
        scores=scores.cpu(),
        num_pages=num_pages.cpu(),
        top_k=top_k,
        pin_last=pin_last.cpu() if isinstance(pin_last, torch.Tensor) else pin_last,
    )
    if sizes:  # force the two-pass or looping paths at test sizes
        tuning = replace(DEFAULT_TUNING, **sizes)
        got_scores, got_indices = _select_pages_triton(
            scores, num_pages, top_k, pin_last, tuning=tuning, chunk=chunk
        )
    else:
        got_scores, got_indices = select_pages(
            scores=scores, num_pages=num_pages, top_k=top_k, pin_last=pin_last, impl=impl
        )
    assert got_indices.dtype == torch.int32 and got_scores.dtype == torch.float32
    assert torch.equal(got_indices.cpu(), want_indices)
    assert torch.equal(got_scores.cpu(), want_scores)


def _pins(device):
    return [True, False, torch.tensor([True, False, True, True], device=device)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 3, 8, 50])  # 50 > every row: k clamps to num_pages
@pytest.mark.parametrize("pin", range(3), ids=["pin", "nopin", "pin-tensor"])
def test_ragged_rows_match_ref(device, impl, top_k, pin):
    # One page, an empty sequence, a full row and a partial one.
    scores, num_pages = _scores(device, num_pages=[1, 0, 37, 20], seed=top_k)
    _check(scores, num_pages, top_k, _pins(device)[pin], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [2, 7, 19])
def test_ties_go_to_the_lower_index(device, impl, top_k):
    scores, num_pages = _scores(device, num_pages=[33, 5, 20, 33], heads=3, ties=True, seed=top_k)
    _check(scores, num_pages, top_k, _pins(device)[2], impl=impl)
    _check(scores, num_pages, top_k, False, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_infinities_nan_and_signed_zero(device, impl):
    scores, num_pages = _scores(device, num_pages=[12, 9], heads=1, width=12)
    scores[0, 0, :6] = torch.tensor([-math.inf, 0.0, -0.0, math.nan, math.inf, -0.0])
    scores[1, 0, :9] = -math.inf  # every valid page scores -inf: still selected
    for top_k in (3, 8):
        _check(scores, num_pages, top_k, False, impl=impl)
        _check(scores, num_pages, top_k, True, impl=impl)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(select_single_pass_max=8, chunk=8),  # two passes, candidates in registers
        # pass 2 loops
        dict(select_single_pass_max=8, chunk=16, select_register_max=16, select_loop_block=8),
        # one pass, loops
        dict(select_single_pass_max=8, chunk=64, select_register_max=16, select_loop_block=16),
    ],
    ids=["two-pass", "two-pass-looping", "one-pass-looping"],
)
@pytest.mark.parametrize("ties", [False, True])
def test_long_row_paths(device, sizes, ties):
    scores, num_pages = _scores(device, num_pages=[45, 0, 30, 8], ties=ties, seed=11)
    _check(scores, num_pages, 3, _pins(device)[2], **sizes)
    _check(scores, num_pages, 6, True, **sizes)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_rows_or_no_pages(device, impl):
    for num_pages, width in (([], 4), ([0, 0], 0)):
        scores, pages = _scores(device, num_pages=num_pages or [0], width=width)
        scores, pages = scores[: len(num_pages)], pages[: len(num_pages)]
        _check(scores, pages, 4, True, impl=impl)


def test_non_contiguous_scores(device):
    scores, num_pages = _scores(device, num_pages=[10, 7], heads=3, width=10, seed=3)
    strided = scores.transpose(1, 2).contiguous().transpose(1, 2)
    _check(strided, num_pages, 4, True, impl="triton")
    _check(scores[:, ::2], num_pages, 4, True, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "seqs, width, top_k",
    [(1, 2048, 256), (16, 2048, 256), (1, 8192, 256), (2, 65536, 256), (1, 65536, 4096)],
)
@pytest.mark.parametrize("ties", [False, True])
def test_engine_sizes_on_gpu(device, seqs, width, top_k, ties):
    lengths = [width - 7 * s for s in range(seqs)]
    scores, num_pages = _scores(device, num_pages=lengths, heads=8, width=width, ties=ties)
    pins = torch.arange(seqs, device=device) % 2 == 0
    _check(scores, num_pages, top_k, pins, impl="triton")


BAD = {
    "scores rank": (lambda s, n: dict(scores=s[0]), "scores must have 3 dimensions"),
    "scores dtype": (lambda s, n: dict(scores=s.bfloat16()), "scores must have dtype"),
    "num_pages dtype": (lambda s, n: dict(num_pages=n.float()), "num_pages must have dtype"),
    "num_pages rows": (lambda s, n: dict(num_pages=n[:1]), r"num_pages.shape\[0\]"),
    "num_pages device": (lambda s, n: dict(num_pages=n.to("meta")), "num_pages is on meta"),
    "top_k zero": (lambda s, n: dict(top_k=0), "top_k must be an int >= 1"),
    "top_k bool": (lambda s, n: dict(top_k=True), "top_k must be an int >= 1"),
    "pin dtype": (lambda s, n: dict(pin_last=n), "pin_last must have dtype"),
    "pin rows": (lambda s, n: dict(pin_last=n[:1] > 0), r"pin_last.shape\[0\]"),
    "pin type": (lambda s, n: dict(pin_last=1), "pin_last must be a bool"),
    "impl": (lambda s, n: dict(impl="numpy"), "impl must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_argument(device, case):
    scores, num_pages = _scores(device, num_pages=[4, 2])
    change, match = BAD[case]
    args = dict(scores=scores, num_pages=num_pages, top_k=2, pin_last=True)
    with pytest.raises(ValueError, match=match):
        select_pages(**{**args, **change(scores, num_pages)})
