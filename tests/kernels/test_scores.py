"""page_scores (Triton and PyTorch paths) against page_scores_ref."""

from dataclasses import replace

import pytest
import torch

from longquest.kernels import DEFAULT_TUNING
from longquest.kernels.ref import page_scores_ref
from longquest.kernels.scores import page_scores

IMPLS = ("triton", "torch")


def _inputs(device, *, seqs, qo_heads, kv_heads, head_dim, pool, num_pages, width, dtype, seed):
    """Random query and bounds; every sequence's page table is a shuffled slice of the pool."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(seqs, qo_heads, head_dim, generator=gen).to(dtype)
    key_min = torch.randn(pool, kv_heads, head_dim, generator=gen)
    key_max = (key_min + torch.rand(pool, kv_heads, head_dim, generator=gen)).to(dtype)
    key_min = key_min.to(dtype)
    # Padding entries point at page 0, like the engine's tables.
    table = torch.zeros(seqs, width, dtype=torch.int32)
    for s, n in enumerate(num_pages):
        table[s, :n] = torch.randperm(pool, generator=gen)[:n].int()
    args = dict(
        query=query,
        key_min=key_min,
        key_max=key_max,
        page_table=table,
        num_pages=torch.tensor(num_pages, dtype=torch.int32),
    )
    return {name: t.to(device) for name, t in args.items()}


def _check(args, impl, *, rtol=1e-6, atol=1e-5, **options):
    expected = page_scores_ref(**{name: t.cpu() for name, t in args.items()})
    got = page_scores(**args, impl=impl, **options)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.cpu(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "qo_heads, kv_heads", [(2, 2), (4, 2), (3, 1), (8, 2), (16, 2), (6, 1)], ids=str
)  # GQA ratios 1, 2, 3, 4, 8 and MQA
def test_every_gqa_ratio_ragged_batch(device, impl, qo_heads, kv_heads):
    # One page, a full table, an empty sequence and a partial one in a single batch.
    args = _inputs(
        device,
        seqs=4,
        qo_heads=qo_heads,
        kv_heads=kv_heads,
        head_dim=32,
        pool=40,
        num_pages=[1, 37, 0, 20],
        width=37,
        dtype=torch.float32,
        seed=qo_heads * 10 + kv_heads,
    )
    _check(args, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bounds_and_query(device, impl, dtype):
    args = _inputs(
        device,
        seqs=2,
        qo_heads=4,
        kv_heads=2,
        head_dim=64,
        pool=20,
        num_pages=[13, 5],
        width=14,
        dtype=dtype,
        seed=5,
    )
    _check(args, impl)


@pytest.mark.parametrize("programs_per_sm", [3, 5, 40])
def test_rows_split_over_programs(device, programs_per_sm):
    # Rows of 7 blocks over 2 (4 + 3 blocks), 3 (3 + 3 + 1) or 7 programs: the pipelined block
    # loop at every length, and programs that start past the second sequence's 20 pages.
    args = _inputs(
        device,
        seqs=2,
        qo_heads=4,
        kv_heads=1,
        head_dim=32,
        pool=120,
        num_pages=[100, 20],
        width=100,
        dtype=torch.float32,
        seed=programs_per_sm,
    )
    tuning = replace(DEFAULT_TUNING, score_programs_per_sm=programs_per_sm)
    _check(args, "triton", tuning=tuning)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_page_table_unchecked_and_int64(device, impl):
    args = _inputs(
        device,
        seqs=2,
        qo_heads=4,
        kv_heads=1,
        head_dim=32,
        pool=30,
        num_pages=[9, 4],
        width=9,
        dtype=torch.float32,
        seed=6,
    )
    wide = torch.zeros(2, 18, dtype=torch.int64, device=device)
    wide[:, ::2] = args["page_table"]
    args["page_table"] = wide[:, ::2]  # non-contiguous view, int64
    args["num_pages"] = args["num_pages"].long()
    args["query"] = args["query"].transpose(0, 1).contiguous().transpose(0, 1)
    _check(args, impl, check_pages=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_sequences_or_no_pages(device, impl):
    for seqs, width in ((0, 4), (2, 0)):
        args = _inputs(
            device,
            seqs=seqs,
            qo_heads=2,
            kv_heads=1,
            head_dim=32,
            pool=4,
            num_pages=[0] * seqs,
            width=width,
            dtype=torch.float32,
            seed=7,
        )
        _check(args, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qo_heads, kv_heads", [(32, 8), (28, 4), (8, 1)], ids=str)
def test_head_dim_128_long_tables_on_gpu(device, dtype, qo_heads, kv_heads):
    args = _inputs(
        device,
        seqs=3,
        qo_heads=qo_heads,
        kv_heads=kv_heads,
        head_dim=128,
        pool=5000,
        num_pages=[4096, 1, 2500],
        width=4100,
        dtype=dtype,
        seed=8,
    )
    _check(args, "triton", rtol=1e-5, atol=1e-4)


def _good(device):
    return _inputs(
        device,
        seqs=2,
        qo_heads=4,
        kv_heads=2,
        head_dim=32,
        pool=6,
        num_pages=[3, 1],
        width=3,
        dtype=torch.float32,
        seed=9,
    )


BAD = {
    "query rank": (lambda a: dict(query=a["query"][0]), "query must have 3 dimensions"),
    "query dtype": (lambda a: dict(query=a["query"].int()), "query must have dtype"),
    "key_max dtype": (lambda a: dict(key_max=a["key_max"].half()), "key_max must have dtype"),
    "key_max shape": (lambda a: dict(key_max=a["key_max"][:3]), "key_max has shape"),
    "head_dim": (lambda a: dict(query=a["query"][..., :16]), r"key_min.shape\[2\] \(head_dim"),
    "group": (lambda a: dict(query=a["query"][:, :3]), r"query heads \(3\) must be a multiple"),
    "table rank": (lambda a: dict(page_table=a["page_table"][0]), "page_table must have 2"),
    "table dtype": (lambda a: dict(page_table=a["page_table"].float()), "page_table must have"),
    "table rows": (lambda a: dict(page_table=a["page_table"][:1]), r"page_table.shape\[0\]"),
    "table range": (
        lambda a: dict(page_table=a["page_table"] + 4),
        "page_table points outside the page pool",
    ),
    "negative page": (lambda a: dict(page_table=a["page_table"] - 5), "page_table points outside"),
    "num_pages range": (lambda a: dict(num_pages=a["num_pages"] + 1), "num_pages must lie in"),
    "num_pages rows": (lambda a: dict(num_pages=a["num_pages"][:1]), r"num_pages.shape\[0\]"),
    "device": (lambda a: dict(key_min=a["key_min"].to("meta")), "key_min is on meta"),
    "impl": (lambda a: dict(impl="cuda"), "impl must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_argument(device, case):
    args = _good(device)
    change, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        page_scores(**{**args, **change(args)})


def test_unused_padding_entries_are_not_checked(device):
    args = _good(device)
    args["page_table"][1, 1:] = 10_000  # past num_pages[1] = 1: ignored
    _check(args, "triton")


def test_tensor_core_form_only_for_groups_it_holds():
    """The tensor-core forms pad a KV head's query group to 16 rows; a larger group must
    fall back to the elementwise form, which takes any group."""
    from types import SimpleNamespace

    from longquest.kernels.scores import dot_options

    def fake(shape):
        return SimpleNamespace(shape=shape, dtype=torch.bfloat16,
                               device=SimpleNamespace(type="cuda"))  # fmt: skip

    bounds = fake((64, 2, 128))
    assert dot_options(fake((1, 32, 128)), bounds)["USE_DOT"]  # group 16
    assert not dot_options(fake((1, 64, 128)), bounds)["USE_DOT"]  # group 32
