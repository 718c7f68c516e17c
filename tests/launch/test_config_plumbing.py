"""Every CLI option reaches the engine's config under every launcher.

The options of ``longquest generate`` and ``longquest batch`` are read from the
parser itself: each is either an engine setting (listed in ``ENGINE_OPTIONS`` with
a non-default value and the EngineConfig field that must hold it) or listed in
``NOT_ENGINE``. An option added to the parser without either fails here; an
engine option that a launcher drops fails the launcher's case. No model is
loaded: each launcher runs up to the call that builds a rank's engine, which
records the config it received.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from longquest.engine.config import EngineConfig, SamplingParams
from longquest.kernels import DEFAULT_TUNING
from longquest.launch import cli, torchrun

MODEL = "/models/plumbing-check"  # absolute: the Ray launcher resolves the path

# option -> (arguments giving it a non-default value, check on the rank's EngineConfig)
ENGINE_OPTIONS: dict[str, tuple[list[str], Callable[[EngineConfig], bool]]] = {
    "--model": (["--model", MODEL], lambda c: c.model == MODEL),
    "--budget": (["--budget", "512"], lambda c: c.quest.token_budget == 512),
    "--dense": (["--dense"], lambda c: c.quest.token_budget is None),
    "--page-size": (["--page-size", "32"], lambda c: c.quest.page_size == 32),
    "--dense-layers": (["--dense-layers", "5"], lambda c: c.quest.dense_layers == 5),
    "--group-pages": (["--group-pages", "8"], lambda c: c.quest.group_pages == 8),
    "--group-margin": (
        ["--group-pages", "8", "--group-margin", "3"],
        lambda c: c.quest.group_margin == 3.0,
    ),
    "--device": (["--device", "cpu"], lambda c: c.device == "cpu"),
    "--dtype": (["--dtype", "float16"], lambda c: c.dtype == "float16"),
    "--cache-tokens": (["--cache-tokens", "4096"], lambda c: c.cache.max_tokens == 4096),
    "--bounds-dtype": (
        ["--bounds-dtype", "float8_e4m3fn"],
        lambda c: c.cache.bounds_dtype == "float8_e4m3fn",
    ),
    "--prefill-chunk": (["--prefill-chunk", "100"], lambda c: c.prefill_chunk_tokens == 100),
    "--no-spread-selection": (["--no-spread-selection"], lambda c: not c.quest.spread_selection),
    "--world-size": (["--world-size", "3"], lambda c: c.parallel.world_size == 3),
    "--tensor-parallel-size": (
        ["--tensor-parallel-size", "3"],
        lambda c: c.parallel.tensor_parallel_size == 3,
    ),
    "--data-parallel-size": (
        ["--data-parallel-size", "2"],
        lambda c: c.parallel.data_parallel_size == 2,
    ),
    "--allow-long-context": (["--allow-long-context"], lambda c: c.allow_long_context),
    "--no-prefix-caching": (["--no-prefix-caching"], lambda c: not c.prefix_caching),
    # The launcher is the test's parameter; its check is made for every case.
    "--launcher": ([], lambda c: True),
}
# Options that are not engine settings: what to run, sampling, batch bookkeeping.
NOT_ENGINE = {
    "generate": {"--help", "--prompt", "--prompt-file", "--chat", "--max-tokens",
                 "--temperature", "--top-p", "--top-k", "--seed", "--stop", "--logprobs",
                 "--ignore-eos"},
    "batch": {"--help", "--input", "--output", "--group-size", "--retry-errors"},
}  # fmt: skip
# Arguments the subcommands need that are not under test.
REQUIRED = {"generate": ["--prompt", "hi"], "batch": ["--input", "in.jsonl", "--output", "o"]}
EXCLUSIVE = ("--budget", "--dense")  # one run gives each of these


class Reached(Exception):
    """Raised where a rank would build its engine: the config got this far."""


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    # argparse has no public accessor for a parser's actions or subcommands.
    (commands,) = [
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    return {name: commands.choices[name] for name in ("generate", "batch")}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        next(s for s in action.option_strings if s.startswith("--")): action
        for action in parser._actions
        if action.option_strings
    }


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_every_option_is_an_engine_setting_or_listed_as_not_one(command):
    options = set(_options(_subparsers()[command]))
    unknown = options - set(ENGINE_OPTIONS) - NOT_ENGINE[command]
    assert not unknown, (
        f"`longquest {command}` options {sorted(unknown)} are neither plumbed into EngineConfig "
        "(ENGINE_OPTIONS, with a check) nor listed in NOT_ENGINE"
    )


def test_the_values_under_test_are_not_the_defaults():
    for command, parser in _subparsers().items():
        options = _options(parser)
        for option, (argv, _) in ENGINE_OPTIONS.items():
            if option not in options or not argv:
                continue
            base = parser.parse_args([*REQUIRED[command], "--model", "m"])
            given = parser.parse_args([*REQUIRED[command], "--model", "m", *argv])
            dest = options[option].dest
            assert getattr(given, dest) != getattr(base, dest), f"{command} {option}"


def _runs(command: str, launcher: str) -> list[tuple[list[str], list[str]]]:
    """Argument lists covering every engine option of ``command`` (the exclusive pair
    needs two runs), with the options each run checks."""
    present = [o for o in _options(_subparsers()[command]) if o in ENGINE_OPTIONS]
    if launcher != "ray":  # one device, or one replica of torchrun ranks
        present = [o for o in present if o != "--data-parallel-size"]
    if launcher == "local":
        one_device = ("--world-size", "--tensor-parallel-size")
        present = [o for o in present if o not in one_device]
    runs = []
    for left_out in EXCLUSIVE:
        chosen = [o for o in present if o != left_out]
        argv = [arg for option in chosen for arg in ENGINE_OPTIONS[option][0]]
        if command == "batch":
            argv += ["--launcher", launcher]
        runs.append(([command, *REQUIRED[command], *argv], chosen))
    return runs


def _local(monkeypatch, argv: list[str]) -> list[EngineConfig]:
    got = []

    def build_engine(config, **_):
        got.append(config)
        raise Reached

    monkeypatch.setattr("longquest.engine.builder.build_engine", build_engine)
    with pytest.raises(Reached):
        cli.main(argv)
    return got


def _ray(monkeypatch, argv: list[str]) -> list[EngineConfig]:
    """The driver's cluster replaced by one that runs each RankWorker.setup in this
    process (no actors, no process group): what every rank's build_worker receives."""
    pytest.importorskip("ray")
    from longquest.launch import ray_cluster

    got = []

    class InProcessCluster:
        def __init__(self, config, **_):
            setups = ray_cluster.worker_setups(
                config, master_addr="127.0.0.1", master_port=1, use_gpu=False, timeout_s=1.0
            )
            for setup in setups:
                ray_cluster.RankWorker().setup(setup)
            raise Reached

    def build_worker(config, *, group, rank, device):
        got.append(config)
        return None, None

    monkeypatch.setattr(ray_cluster, "RayCluster", InProcessCluster)
    # The driver's layout check reads config.json, which MODEL is not (test_tensor_layout).
    monkeypatch.setattr("longquest.launch.api.check_tensor_layout", lambda config: None)
    # No Ray: the replicas' capacity check is tested in test_replicas.
    monkeypatch.setattr("longquest.launch.replicas.init_ray", lambda **_: False)
    monkeypatch.setattr("longquest.launch.replicas.ray.cluster_resources", lambda: {})
    monkeypatch.setattr("longquest.launch.replicas.ray.nodes", lambda: [])
    monkeypatch.setattr("longquest.launch.replicas.check_capacity", lambda *_, **__: None)
    monkeypatch.setattr("longquest.parallel.worker.build_worker", build_worker)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **_: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ray_cluster, "cpu_threads", lambda: 1)
    with pytest.raises(Reached):
        cli.main(argv)
    parallel = got[0].parallel
    assert len(got) == parallel.world_size * parallel.data_parallel_size
    return got


def _torchrun(monkeypatch, argv: list[str]) -> list[EngineConfig]:
    """The command the CLI starts, then that command's arguments run through the
    torchrun entry up to build_worker."""
    commands = []
    monkeypatch.setattr(cli, "run_quietly_on_interrupt", lambda c: commands.append(c) or 0)
    # The driver's layout check reads config.json, which MODEL is not (test_tensor_layout).
    monkeypatch.setattr("longquest.launch.api.check_tensor_layout", lambda config: None)
    assert cli.main(argv) == 0
    (command,) = commands
    entry = command[command.index("longquest.launch.torchrun") + 1 :]
    sent = EngineConfig.from_json(entry[entry.index("--config-json") + 1])
    assert EngineConfig.from_json(sent.to_json()) == sent
    assert f"--nproc-per-node={sent.parallel.world_size}" in command

    got = []

    def build_worker(config, *, group, rank, device):
        got.append(config)
        raise Reached

    world = sent.parallel.world_size
    monkeypatch.setattr(torchrun, "init_distributed", lambda **_: (0, world, torch.device("cpu")))
    monkeypatch.setattr("longquest.parallel.worker.build_worker", build_worker)
    monkeypatch.setattr(torchrun.dist, "destroy_process_group", lambda: None)
    with pytest.raises(Reached):
        torchrun.main(entry)
    assert got == [sent]
    return got


LAUNCHERS = {"local": _local, "ray": _ray, "torchrun": _torchrun}


@pytest.mark.parametrize(
    "command, launcher",
    [("generate", "local"), ("batch", "local"), ("batch", "ray"), ("batch", "torchrun")],
)
def test_every_engine_option_reaches_the_ranks(monkeypatch, tmp_path, command, launcher):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')  # checked before loading
    for argv, chosen in _runs(command, launcher):
        for config in LAUNCHERS[launcher](monkeypatch, argv):
            assert config.parallel.launcher == launcher
            dropped = [o for o in chosen if not ENGINE_OPTIONS[o][1](config)]
            assert not dropped, f"{launcher}: {dropped} did not reach the engine ({config})"


def test_torchrun_entry_takes_the_same_engine_options():
    """Started directly (``torchrun -m longquest.launch.torchrun``), the entry's engine
    options are the CLI's, and the rest are listed here."""
    entry = set(_options(torchrun.build_parser()))
    shared = set(_options(_subparsers()["generate"])) & set(ENGINE_OPTIONS)
    assert shared <= entry
    own = {"--config-json", "--timeout", "--input", "--output", "--group-size", "--retry-errors",
           "--tensor-parallel-size"}  # fmt: skip
    assert entry - shared - NOT_ENGINE["generate"] == own


def test_engine_config_reads_back_from_json_and_refuses_what_it_does_not_know():
    from longquest.engine.config import CacheConfig, ParallelConfig, QuestConfig

    config = EngineConfig(
        model=MODEL,
        dtype="bfloat16",
        quest=QuestConfig(token_budget=None, spread_selection=False),
        cache=CacheConfig(max_tokens=100, bounds_dtype="float8_e4m3fn"),
        parallel=ParallelConfig(world_size=2, launcher="ray", split_mlp=False),
        tuning=dataclasses.replace(DEFAULT_TUNING, decode_tokens_per_block=32),
    )
    assert EngineConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        EngineConfig.from_json('{"model": "m", "budget": 1}')
    with pytest.raises(ValueError, match="launcher='local' runs on one device"):
        ParallelConfig(world_size=2)
    with pytest.raises(ValueError, match="must be a QuestConfig"):
        EngineConfig(model=MODEL, quest={"token_budget": 1})


def test_llm_takes_a_config_or_settings_not_both():
    from longquest.engine.config import ParallelConfig
    from longquest.launch.api import LLM

    with pytest.raises(ValueError, match="not both"):
        LLM(config=EngineConfig(model=MODEL), dtype="float32")
    with pytest.raises(ValueError, match="not both"):
        LLM(MODEL, config=EngineConfig(model=MODEL))
    torchrun_config = EngineConfig(model=MODEL, parallel=ParallelConfig(launcher="torchrun"))
    with pytest.raises(ValueError, match="'local' or the 'ray' launcher"):
        LLM(config=torchrun_config)


def test_the_kernel_tuning_reaches_the_engine(tmp_path, monkeypatch):
    """A non-default KernelTuning in the config is what the engine's attention is given."""
    from longquest.engine import builder
    from longquest.engine import engine as engine_module
    from longquest.engine.builder import build_engine
    from tests.tiny_models import make_tiny_model

    seen = []

    class Spy(engine_module.PagedAttention):
        def __init__(self, **kwargs):
            seen.append(kwargs["tuning"])
            super().__init__(**kwargs)

    monkeypatch.setattr(engine_module, "PagedAttention", Spy)
    # The tiny model has no tokenizer; the engine needs only its EOS ids and a decoder.
    monkeypatch.setattr(builder, "Tokenizer", lambda path: SimpleNamespace(
        eos_token_ids=(), decode=lambda ids: " ".join(map(str, ids))))  # fmt: skip
    tuning = dataclasses.replace(DEFAULT_TUNING, decode_tokens_per_block=32)
    model_dir = make_tiny_model(tmp_path, architecture="llama3.1")
    config = EngineConfig(model=str(model_dir), device="cpu", tuning=tuning)
    engine, _ = build_engine(config)
    assert engine.tuning is config.tuning
    engine.generate([[1, 2, 3]], [SamplingParams(max_tokens=3, ignore_eos=True)])
    assert seen and all(t is tuning for t in seen)


def test_llm_settings_carry_the_tensor_parallel_size():
    from longquest.launch.api import engine_config

    config = engine_config(
        MODEL, dtype="auto", device=None, quest=None, cache=None, world_size=4,
        tensor_parallel_size=2, launcher="ray", prefill_chunk_tokens=8192, impl=None,
        allow_long_context=False, prefix_caching=True,
    )  # fmt: skip
    assert config.parallel.tensor_parallel_size == 2
    assert config.parallel.sequence_parallel_size == 2
    assert EngineConfig.from_json(config.to_json()) == config
