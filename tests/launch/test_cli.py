"""The ``longquest generate`` command and the LLM API on the real demo model (CPU)."""

from __future__ import annotations

import pytest

from longquest.launch.cli import main


@pytest.fixture(scope="module")
def model_dir():
    from longquest.launch.assets import ensure_demo_model

    return str(ensure_demo_model())


def test_generate_prints_text_and_summary(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is Paris. " * 60 + "What is the capital of France?")
    code = main([
        "generate", "--model", model_dir, "--prompt-file", str(prompt), "--chat",
        "--max-tokens", "8", "--budget", "64", "--device", "cpu", "--dtype", "float32",
    ])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0
    assert "Paris" in out.out
    summary = out.err.strip().splitlines()[-1]
    assert summary.startswith("[longquest] context ")
    assert "quest budget 64" in summary and "pages attended per step 4 of " in summary
    assert "tok/s" in summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "hi", "--budget", "8"], "smaller than one page"),
        (["--prompt", "hi", "--page-size", "12"], "power of two"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "hi", "--dtype", "int8"], "unknown dtype"),
    ],
)
def test_bad_arguments_are_clear_errors(model_dir, capsys, extra, message):
    args = ["generate", "--model", model_dir, "--device", "cpu", *extra]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse-level refusals
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert message in err


def test_missing_model_directory(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi",
                 "--device", "cpu"])  # fmt: skip
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_api_refuses_too_long_before_work(model_dir):
    from longquest import LLM, CacheConfig, SamplingParams

    llm = LLM(model_dir, device="cpu", dtype="float32", cache=CacheConfig(max_tokens=256))
    with pytest.raises(ValueError, match="cache holds"):
        llm.generate(["word " * 400], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""])
    (out,) = llm.generate("Say hi.", SamplingParams(max_tokens=3, logprobs=2))
    assert len(out.token_ids) <= 3 and len(out.logprobs[0]) >= 2


def test_bounds_dtype_flag_builds_the_cache_config():
    from longquest.engine.config import CacheConfig
    from longquest.launch.cli import build_parser, cache_from_args

    base = ["generate", "--model", "m", "--prompt", "hi"]
    assert cache_from_args(build_parser().parse_args(base)) == CacheConfig()
    args = build_parser().parse_args([*base, "--bounds-dtype", "float8_e4m3fn"])
    cache = cache_from_args(args)
    assert cache.bounds_dtype == "float8_e4m3fn" and cache.max_tokens is None
    args = build_parser().parse_args([*base, "--cache-tokens", "512"])
    assert cache_from_args(args).max_tokens == 512 and cache_from_args(args).bounds_dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--bounds-dtype", "int8"])


def test_no_spread_selection_flag_builds_the_quest_config():
    from longquest.launch.cli import build_parser, quest_from_args

    base = ["generate", "--model", "m", "--prompt", "p"]
    assert quest_from_args(build_parser().parse_args(base)).spread_selection is True
    args = build_parser().parse_args([*base, "--no-spread-selection"])
    assert quest_from_args(args).spread_selection is False


def test_demo_defaults_are_run_demos():
    """The demo command's defaults come from run_demo's signature, written once."""
    import inspect

    from longquest.launch.cli import build_parser
    from longquest.launch.demo import run_demo

    args = build_parser().parse_args(["demo"])
    defaults = {n: p.default for n, p in inspect.signature(run_demo).parameters.items()}
    assert (args.trials, args.context, args.budget) == (
        defaults["trials"], defaults["context_tokens"], defaults["token_budget"],
    )  # fmt: skip
    assert (args.page_size, args.world_size, args.launcher) == (
        defaults["page_size"], defaults["world_size"], defaults["launcher"],
    )  # fmt: skip
