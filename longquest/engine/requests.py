"""What a request must satisfy before the engine does any work for it."""

from __future__ import annotations

from longquest.engine.config import ModelConfig, SamplingParams


def check_request(
    *,
    index: int,
    prompt: list[int],
    params: SamplingParams,
    model_config: ModelConfig,
    allow_long_context: bool,
) -> None:
    """Raise ValueError, naming request ``index`` and what to change, if ``prompt`` is
    empty, has token ids outside the vocabulary, asks for more logprobs than the vocabulary
    holds, or (unless ``allow_long_context``) reaches past the model's declared context."""
    if not prompt:
        raise ValueError(f"prompt {index} is empty; give at least one token")
    vocab = model_config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        bad = next(t for t in prompt if not 0 <= t < vocab)
        raise ValueError(f"prompt {index} has token id {bad}; the vocabulary is 0..{vocab - 1}")
    if params.logprobs is not None and params.logprobs > vocab:
        raise ValueError(
            f"prompt {index} asks for logprobs={params.logprobs}, more than the model's "
            f"vocabulary of {vocab} tokens; ask for at most {vocab}"
        )
    total = len(prompt) + params.max_tokens
    context = model_config.context_length
    if total > context and not allow_long_context:
        raise ValueError(
            f"prompt {index} has {len(prompt)} tokens; with max_tokens={params.max_tokens} "
            f"it reaches {total} tokens, past the model's context of {context} tokens "
            "(its config.json); shorten the prompt or lower max_tokens, or allow it with "
            "--allow-long-context (EngineConfig(allow_long_context=True))"
        )
