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
    from longquest.launch.cli import build_parser
    from longquest.launch.options import cache_from_args

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
    from longquest.launch.cli import build_parser
    from longquest.launch.options import quest_from_args

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


def test_version(capsys):
    import longquest

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"longquest {longquest.__version__}"


def test_generate_help_says_what_each_option_does():
    from longquest.launch.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if a.dest == "command"]
    generate = commands.choices["generate"]
    undocumented = [a.option_strings for a in generate._actions if a.option_strings and not a.help]
    assert not undocumented
    text = " ".join(generate.format_help().split())
    assert "default: CUDA when available, else the CPU" in text
    assert "default: cuda)" not in text


def test_sampling_flags_build_the_sampling_params():
    from longquest.engine.config import SamplingParams
    from longquest.launch.cli import build_parser
    from longquest.launch.options import sampling_from_args

    base = ["generate", "--model", "m", "--prompt", "p"]
    assert sampling_from_args(build_parser().parse_args(base)) == SamplingParams()
    args = build_parser().parse_args([
        *base, "--max-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40",
        "--seed", "3", "--stop", "END", "--stop", "\n\n", "--logprobs", "2", "--ignore-eos",
    ])  # fmt: skip
    assert sampling_from_args(args) == SamplingParams(
        max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=("END", "\n\n"),
        logprobs=2, ignore_eos=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--max-tokens", "0"],
            "--max-tokens must be a whole number >= 1 (tokens to generate), got 0",
        ),
        (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0.0"),
        (["--top-k", "0"], "--top-k must be -1 (off) or a whole number >= 1, got 0"),
        (["--stop", ""], "--stop"),
        (["--logprobs", "-1"], "--logprobs must be None or a whole number >= 0"),
    ],
)
def test_a_bad_sampling_flag_is_named_before_the_model_loads(tmp_path, capsys, flags, message):
    code = main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "SamplingParams" not in err


@pytest.mark.parametrize("launcher", ["local", "ray", "torchrun", None])
def test_an_unknown_device_is_refused_under_every_launcher(tmp_path, monkeypatch, capsys, launcher):
    """Refused from the EngineConfig, before a model, Ray or torchrun starts."""
    import longquest.launch.api as api
    from longquest.launch import cli

    def never(*args, **kwargs):
        raise AssertionError("started work with an unknown device")

    monkeypatch.setattr(api, "LLM", never)
    monkeypatch.setattr(cli, "run_quietly_on_interrupt", never)
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hi"}\n')
    if launcher is None:
        args = ["generate", "--prompt", "hi"]
    else:
        args = ["batch", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                "--launcher", launcher]  # fmt: skip
    code = main([*args, "--model", str(tmp_path), "--device", "tpu"])
    assert code == 2
    assert "unknown device 'tpu'; use 'cuda', 'cuda:N' or 'cpu'" in capsys.readouterr().err


def test_the_torchrun_entry_refuses_an_unknown_device(capsys):
    from longquest.launch import torchrun

    with pytest.raises(SystemExit) as exit_:
        torchrun.main(["--model", "m", "--prompt", "hi", "--device", "tpu"])
    assert exit_.value.code == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_a_prompt_past_the_models_context_is_refused_with_the_option(model_dir, tmp_path, capsys):
    """SmolLM2 declares 8192 positions; the refusal names both lengths and the flag."""
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 9000)
    args = ["generate", "--model", model_dir, "--prompt-file", str(prompt), "--device", "cpu",
            "--dtype", "float32", "--max-tokens", "4"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "past the model's context of 8192 tokens" in err and "--allow-long-context" in err
    assert "with max_tokens=4 it reaches 900" in err


def test_generate_prints_logprobs_when_asked(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--prompt", "Say hi.", "--device", "cpu",
            "--dtype", "float32", "--max-tokens", "3", "--logprobs", "2", "--top-k", "5",
            "--temperature", "0.8", "--seed", "1", "--stop", "zzz"]  # fmt: skip
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[logprobs]")]
    assert 1 <= len(lines) <= 3 and all(line.count(", ") >= 1 for line in lines)


def test_ray_refuses_cuda_without_gpus_instead_of_running_on_the_cpu(monkeypatch):
    ray = pytest.importorskip("ray")
    from longquest.engine.config import EngineConfig, ParallelConfig
    from longquest.launch.ray_cluster import RayCluster

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    parallel = ParallelConfig(world_size=2, launcher="ray")
    with pytest.raises(ValueError, match="device cuda: world_size=2 needs 2 GPUs .* has 0"):
        RayCluster(EngineConfig(model="m", device="cuda", parallel=parallel))


def test_llm_takes_allow_long_context():
    from longquest.launch.api import engine_config

    settings = dict(dtype="auto", device=None, quest=None, cache=None, world_size=1,
                    launcher="local", prefill_chunk_tokens=64, impl=None,
                    prefix_caching=True)  # fmt: skip
    assert engine_config("m", **settings, allow_long_context=True).allow_long_context
    assert not engine_config("m", **settings, allow_long_context=False).allow_long_context


def test_cache_tokens_zero_is_refused_not_taken_as_the_default(tmp_path, capsys):
    from longquest.launch.cli import main

    assert (
        main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--cache-tokens", "0"]) == 2
    )
    assert "max_tokens" in capsys.readouterr().err
