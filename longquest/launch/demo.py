"""The README's main job on its embedded default: passkey questions over long documents,
answered by SmolLM2-135M-Instruct with Quest sparse decoding on sequence-parallel
CPU workers (Ray actors). Needs no GPU; the model and texts are fetched once."""

from __future__ import annotations

import time

from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams


def run_demo(
    *,
    trials: int = 4,
    context_tokens: int = 3000,
    token_budget: int = 512,
    page_size: int = 4,
    world_size: int = 2,
    launcher: str = "ray",
    max_tokens: int = 12,
) -> int:
    """Run the demo; print answers, accuracy, pages attended and time. Returns 0."""
    from transformers import AutoTokenizer

    from longquest.launch.api import LLM
    from longquest.launch.assets import ensure_demo_model, ensure_texts
    from longquest.launch.tasks import make_passkey_task, passkey_prompt_ids, score_passkey

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    start = time.perf_counter()
    model_dir = ensure_demo_model(install=True)
    texts = list(ensure_texts(install=True).values())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = [
        make_passkey_task(
            tokenizer=tokenizer,
            texts=texts,
            context_tokens=context_tokens,
            depth=(i + 0.5) / trials,
            seed=1000 + i,
        )
        for i in range(trials)
    ]
    prompts = [passkey_prompt_ids(tokenizer=tokenizer, messages=t.prompt_messages) for t in tasks]
    quest = QuestConfig(token_budget=token_budget, page_size=page_size)
    print(
        f"[demo] {trials} documents of ~{context_tokens} tokens, a 5-digit pass key hidden in "
        f"each; SmolLM2-135M-Instruct, Quest budget {token_budget} tokens in pages of "
        f"{page_size}, "
        f"{world_size} {launcher} worker(s) on the CPU"
    )
    llm = LLM(
        model_dir,
        dtype="float32",
        device="cpu",
        quest=quest,
        cache=CacheConfig(max_tokens=trials * (context_tokens + 256) + 4096),
        world_size=world_size,
        launcher=launcher,
        prefill_chunk_tokens=1024,
    )
    setup_done = time.perf_counter()
    try:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens))
    finally:
        llm.shutdown()
    correct = 0
    print(f"{'doc':>3} {'depth':>5} {'tokens':>6} {'key':>5}  {'pages/step':>10}  answer")
    for i, (task, out) in enumerate(zip(tasks, outputs)):
        ok = score_passkey(out.text, task.passkey)
        correct += ok
        answer = out.text.strip().replace("\n", " ")[:40]
        pages = f"{out.pages_attended:.0f}/{out.pages_total:.0f}"
        print(
            f"{i:>3} {task.depth:>5.2f} {len(prompts[i]):>6} {task.passkey:>5}  {pages:>10}  "
            f"{answer!r} {'ok' if ok else 'WRONG'}"
        )
    end = time.perf_counter()
    mean_attended = sum(o.pages_attended for o in outputs) / len(outputs)
    mean_total = sum(o.pages_total for o in outputs) / len(outputs)
    print(
        f"[demo] accuracy {correct}/{trials}; pages attended per decode step (sparse layers) "
        f"{mean_attended:.0f} of {mean_total:.0f} ({100 * mean_attended / mean_total:.0f}%); "
        f"set-up {setup_done - start:.1f} s, generation {end - setup_done:.1f} s, "
        f"total {end - start:.1f} s"
    )
    return 0
