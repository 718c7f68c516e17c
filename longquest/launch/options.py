"""Command-line options shared by ``longquest`` commands and the torchrun entry, and the
configs they build."""

from __future__ import annotations

import argparse
import re

from longquest.engine.config import (
    BOUNDS_DTYPE_NAMES,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)

TENSOR_PARALLEL_HELP = (
    "split the weights T ways over a replica's ranks (T divides the ranks and the model's "
    "KV heads, query heads and MLP width); each shard's ranks // T ranks split its KV pages (1)"
)


def add_model_arguments(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """Options shared by every command that loads a model (see ``engine_config_from_args``)."""
    parser.add_argument("--model", required=model_required, help="Hugging Face model directory")
    sparsity = parser.add_mutually_exclusive_group()
    sparsity.add_argument(
        "--budget", type=int, default=4096, help="Quest token budget per decode step (4096)"
    )
    sparsity.add_argument("--dense", action="store_true", help="attend to every page")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page (16)")
    parser.add_argument("--dense-layers", type=int, default=2, help="leading dense layers (2)")
    parser.add_argument("--group-pages", type=int, default=None,
                        help="two-level selection over groups of this many pages (default: one "
                        "level)")  # fmt: skip
    parser.add_argument("--group-margin", type=float, default=2.0,
                        help="two-level: page budgets the kept groups hold (2)")  # fmt: skip
    parser.add_argument(
        "--device", default=None,
        help="cuda, cuda:N or cpu (default: CUDA when available, else the CPU)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument(
        "--cache-tokens", type=int, default=None, help="KV cache size in tokens (default: fit)"
    )
    parser.add_argument(
        "--bounds-dtype",
        default=None,
        choices=[name for name in BOUNDS_DTYPE_NAMES if name],
        help="store Quest's key bounds in this dtype (default: the model dtype); fp8 halves "
        "the bytes each decode step's page scoring reads, keys beyond +-448 are refused",
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=8192, help="prompt tokens per prefill step (8192)"
    )
    parser.add_argument(
        "--no-spread-selection", action="store_true",
        help="select a long row's pages without spreading it over programs that must all be "
        "resident at once (for GPUs whose SMs other work holds: MPS limits, green contexts)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-long-context", action="store_true",
        help="serve prompts that, with their max tokens, run past the context the model "
        "declares in its config.json (refused by default: the model was not trained there)",
    )  # fmt: skip
    parser.add_argument(
        "--no-prefix-caching", action="store_true",
        help="compute every prompt in full instead of reusing the KV pages of prompt "
        "prefixes seen before (the outputs are those of a full prefill)",
    )  # fmt: skip


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling options of one prompt (see ``sampling_from_args``)."""
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens to generate at most (64)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy (0)")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: keep the top tokens of this much probability, "
                        "in (0, 1] (1: off)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=-1,
                        help="keep the k most likely tokens (-1: off)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None,
                        help="sampler seed, for repeatable sampling (default: random)")  # fmt: skip
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop when the output contains TEXT (repeatable)")  # fmt: skip
    parser.add_argument("--logprobs", type=int, default=None, metavar="N",
                        help="print the N most likely tokens' log-probabilities at each step "
                        "(on stderr)")  # fmt: skip
    parser.add_argument("--ignore-eos", action="store_true",
                        help="go on past the end-of-sequence token up to --max-tokens")  # fmt: skip


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of ``add_sampling_arguments``' options; a bad value is a
    ValueError naming the flag (``--max-tokens must be ...``)."""
    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            logprobs=args.logprobs,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as error:
        flag = re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(error))
        raise ValueError(flag) from None


def quest_from_args(args: argparse.Namespace) -> QuestConfig:
    return QuestConfig(
        page_size=args.page_size,
        token_budget=None if args.dense else args.budget,
        dense_layers=args.dense_layers,
        spread_selection=not args.no_spread_selection,
        group_pages=args.group_pages,
        group_margin=args.group_margin,
    )


def cache_from_args(args: argparse.Namespace) -> CacheConfig:
    """The cache options given (size by default: what memory holds)."""
    return CacheConfig(max_tokens=args.cache_tokens, bounds_dtype=args.bounds_dtype)


def engine_config_from_args(
    args: argparse.Namespace,
    *,
    world_size: int = 1,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    launcher: str = "local",
) -> EngineConfig:
    """The one EngineConfig of the options ``add_model_arguments`` added, which every
    launcher passes to its ranks unchanged."""
    parallel = ParallelConfig(world_size=world_size, tensor_parallel_size=tensor_parallel_size,
                              data_parallel_size=data_parallel_size, launcher=launcher)  # fmt: skip
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quest=quest_from_args(args),
        cache=cache_from_args(args),
        parallel=parallel,
        prefill_chunk_tokens=args.prefill_chunk,
        allow_long_context=args.allow_long_context,
        prefix_caching=not args.no_prefix_caching,
    )
