"""The spread selection (one launch, several programs a row) against select_pages_ref.

On the CPU interpreter a row has one program (programs run one after another there); the
GPU tests spread rows over up to 32 programs.
"""

import math

import pytest
import torch

from longquest.kernels import DEFAULT_TUNING, topk_spread
from longquest.kernels.ref import select_pages_ref
from longquest.kernels.topk import _select_pages_triton, select_pages
from longquest.kernels.topk_spread import make_select_workspace, spread_programs
from tests.kernels.test_topk import _scores


def _check(scores, num_pages, top_k, pin_last, *, spread, workspace=None):
    want_scores, want_indices = select_pages_ref(
        scores=scores.cpu(),
        num_pages=num_pages.cpu(),
        top_k=top_k,
        pin_last=pin_last.cpu() if isinstance(pin_last, torch.Tensor) else pin_last,
    )
    got = _select_pages_triton(
        scores, num_pages, top_k, pin_last, spread=spread, workspace=workspace
    )
    assert torch.equal(got[1].cpu(), want_indices)
    assert torch.equal(got[0].cpu().view(torch.int32), want_scores.view(torch.int32))  # NaN too
    if workspace is not None:
        assert not workspace.any(), "the launch left its workspace dirty"


def _pins(device, seqs):
    return [True, False, torch.arange(seqs, device=device) % 3 != 1]


@pytest.mark.parametrize("top_k", [1, 3, 8, 50])
@pytest.mark.parametrize("pin", range(3), ids=["pin", "nopin", "pin-tensor"])
@pytest.mark.parametrize("ties", [False, True])
def test_one_program_a_row_matches_ref(device, top_k, pin, ties):
    scores, num_pages = _scores(device, num_pages=[1, 0, 37, 20], ties=ties, seed=top_k)
    workspace = make_select_workspace(max_rows=8, device=device)
    _check(scores, num_pages, top_k, _pins(device, 4)[pin], spread=1, workspace=workspace)
    # The workspace is reused as a graph replay would reuse it.
    _check(scores, num_pages, top_k, _pins(device, 4)[pin], spread=1, workspace=workspace)


def test_infinities_nan_and_signed_zero(device):
    scores, num_pages = _scores(device, num_pages=[12, 9], heads=1, width=12)
    scores[0, 0, :6] = torch.tensor([-math.inf, 0.0, -0.0, math.nan, math.inf, -0.0])
    scores[1, 0, :9] = -math.inf
    for top_k in (3, 8, 12):
        _check(scores, num_pages, top_k, True, spread=1)
        _check(scores, num_pages, top_k, False, spread=1)


def test_no_pages_and_a_fresh_workspace(device):
    scores, num_pages = _scores(device, num_pages=[0, 0], width=4)
    _check(scores, num_pages, 3, True, spread=1)  # workspace made by the launcher


def test_dirty_workspace_is_refused_on_the_interpreter(device):
    if device.type != "cpu":
        pytest.skip("checked on the host under the interpreter only (a GPU check would sync)")
    scores, num_pages = _scores(device, num_pages=[20, 9])
    workspace = make_select_workspace(max_rows=4, device=device)
    workspace[1, 3] = 1
    with pytest.raises(ValueError, match="workspace is not zero"):
        _select_pages_triton(scores, num_pages, 4, True, spread=1, workspace=workspace)


def test_bad_spread_arguments(device):
    scores, num_pages = _scores(device, num_pages=[20, 9])
    with pytest.raises(ValueError, match="programs a row must be in"):
        _select_pages_triton(scores, num_pages, 4, True, spread=topk_spread.MAX_PROGRAMS + 1)
    with pytest.raises(ValueError, match=r"workspace has shape"):
        select_pages(
            scores=scores, num_pages=num_pages, top_k=4,
            workspace=torch.zeros(3, 16, dtype=torch.int32, device=device),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"workspace has shape"):
        _select_pages_triton(
            scores, num_pages, 4, True, spread=1,
            workspace=torch.zeros(3, 16, dtype=torch.int32, device=device),
        )  # fmt: skip
    if device.type == "cpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            _select_pages_triton(scores, num_pages, 4, True, spread=2)
    else:  # 16 rows x 32 programs: more than one program an SM
        wide, pages = _scores(device, num_pages=[20, 9], heads=8)
        with pytest.raises(ValueError, match="must be resident at once"):
            _select_pages_triton(wide, pages, 4, True, spread=32)


def test_programs_a_row():
    # One program an SM over the grid, parts of >= min_chunk pages, at most MAX_PROGRAMS.
    assert spread_programs(rows=8, max_pages=32768, sm_count=132, min_chunk=1024) == 16
    assert spread_programs(rows=64, max_pages=6144, sm_count=132, min_chunk=1024) == 2
    assert spread_programs(rows=1, max_pages=500_000, sm_count=132, min_chunk=1024) == 32
    assert spread_programs(rows=2, max_pages=3000, sm_count=132, min_chunk=1024) == 3
    assert spread_programs(rows=200, max_pages=32768, sm_count=132, min_chunk=1024) == 1
    # A part longer than a program holds: not spread.
    assert spread_programs(rows=1, max_pages=10**6, sm_count=132, min_chunk=1024) == 1
    assert spread_programs(rows=66, max_pages=40000, sm_count=132, min_chunk=1024) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [2, 3, 5, 16, 32])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("top_k", [1, 128, 256, 3000])
def test_spread_rows_on_gpu(device, programs, ties, top_k):
    # Ragged rows (one shorter than a program's part, one empty) over `programs` parts; at
    # most one program an SM over the grid (16 or 4 rows).
    lengths = [6000, 5, 0, 4099]
    heads = 4 if programs <= 8 else 1
    scores, num_pages = _scores(device, num_pages=lengths, heads=heads, width=6000, ties=ties)
    workspace = make_select_workspace(max_rows=16, device=device)
    for pin in _pins(device, 4):
        _check(scores, num_pages, top_k, pin, spread=programs, workspace=workspace)


@pytest.mark.gpu
@pytest.mark.parametrize("seqs, width, top_k", [(1, 32768, 256), (2, 16384, 128), (1, 65536, 128)])
def test_engine_shapes_spread_by_default_on_gpu(device, seqs, width, top_k):
    scores, num_pages = _scores(device, num_pages=[width - s for s in range(seqs)], heads=8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = spread_programs(
        rows=seqs * 8, max_pages=width, sm_count=sms, min_chunk=DEFAULT_TUNING.spread_min_chunk
    )
    assert programs >= DEFAULT_TUNING.spread_min_programs
    workspace = make_select_workspace(max_rows=seqs * 8, device=device)
    _check(scores, num_pages, top_k, True, spread=None, workspace=workspace)
    # In a CUDA graph, replayed: the workspace is zero again after every replay.
    graph = torch.cuda.CUDAGraph()
    out = _select_pages_triton(scores, num_pages, top_k, True, workspace=workspace)
    with torch.cuda.graph(graph):
        out = _select_pages_triton(scores, num_pages, top_k, True, workspace=workspace)
    want = select_pages_ref(scores=scores.cpu(), num_pages=num_pages.cpu(), top_k=top_k,
                            pin_last=True)  # fmt: skip
    for _ in range(3):
        out[1].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[1].cpu(), want[1])
        assert not workspace.any()


def test_spread_switch():
    from longquest.engine.config import QuestConfig

    scores, num_pages = _scores(torch.device("cpu"), num_pages=[20, 9])
    with pytest.raises(ValueError, match="spread must be a bool"):
        select_pages(scores=scores, num_pages=num_pages, top_k=4, spread="no")
    with pytest.raises(ValueError, match="spread_selection must be a bool"):
        QuestConfig(spread_selection=1)


@pytest.mark.gpu
def test_spread_off_takes_the_passes_on_gpu(device):
    # A long row that would spread: with spread=False the workspace is never touched.
    scores, num_pages = _scores(device, num_pages=[32768], heads=8)
    workspace = make_select_workspace(max_rows=8, device=device).fill_(7)
    got = select_pages(scores=scores, num_pages=num_pages, top_k=256, workspace=workspace,
                       spread=False)  # fmt: skip
    want = select_pages_ref(scores=scores.cpu(), num_pages=num_pages.cpu(), top_k=256,
                            pin_last=True)  # fmt: skip
    assert torch.equal(got[1].cpu(), want[1])
    assert bool((workspace == 7).all())
