"""Token sampling from logits: greedy, temperature, top-k, top-p, and logprobs."""

from __future__ import annotations

import torch

from longquest.engine.config import SamplingParams


def sample(
    *,
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    logits: ``[num_seqs, vocab_size]`` fp32. ``params`` and ``generators`` have one
    entry per row; a row's generator makes its draws reproducible (seeded requests).
    Returns ``(token_ids [num_seqs] int64, logprobs [num_seqs, vocab_size] fp32)``,
    the log-probabilities of the unmodified distribution (as vLLM reports them).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        row = logits[i].float() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i]).squeeze(0)
    return tokens, logprobs


def top_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, count: int
) -> list[dict[int, float]]:
    """Per row: the sampled token's logprob plus the ``count`` most likely tokens'."""
    rows = []
    values, ids = logprobs.topk(count, dim=-1) if count > 0 else (None, None)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    for i, token in enumerate(tokens.tolist()):
        row = {token: chosen[i]}
        if count > 0:
            row.update(zip(ids[i].tolist(), values[i].tolist(), strict=True))
        rows.append(row)
    return rows
