"""KernelTuning: frozen, keyword-only, validated."""

import dataclasses

import pytest

from longquest.kernels import DEFAULT_TUNING, KernelTuning


def test_default_is_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TUNING.score_num_warps = 8
    with pytest.raises(TypeError):
        KernelTuning(4)  # a positional argument


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(score_num_warps=0), "score_num_warps must be an int >= 1"),
        (dict(rank_block=True), "rank_block must be an int >= 1"),
        (dict(decode_merge_chunk=12), "decode_merge_chunk must be a power of two"),
        (dict(score_fp8_block_pages=8), "score_fp8_block_pages must be >= 16"),
        (dict(select_loop_block=16384), "must not exceed select_register_max"),
    ],
)
def test_bad_values_raise_naming_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(DEFAULT_TUNING, **change)
