"""Passkey retrieval: a five-digit key hidden in long real text, asked for at the end.

The standard "needle" test of long-context decoding. Filler comes from real prose (see
``assets.ensure_texts``), the needle sentence sits at a chosen depth, and the prompt is sized
with the model's own tokenizer and chat template so that it is close to a requested length.
Render a task with :func:`passkey_prompt_ids` so every consumer counts tokens the same way.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about it at the end."
)
QUESTION = "What is the pass key? Answer with the number only."
# Below this much filler the task stops being a retrieval test.
MIN_FILLER_TOKENS = 16
# Relative error allowed between the rendered prompt and context_tokens.
LENGTH_TOLERANCE = 0.02
_FIT_ROUNDS = 6
_MAX_SNAP_CHARS = 400
_CHARS_PER_TOKEN_BOUND = 8  # generous: English prose averages about 4.5 with this tokenizer


@dataclass(frozen=True, kw_only=True)
class PasskeyTask:
    """One passkey-retrieval prompt.

    prompt_messages: chat messages (``{"role", "content"}`` dicts); render them with
        :func:`passkey_prompt_ids` (chat template plus generation prompt).
    passkey: the five digits the answer must contain.
    context_tokens: the requested prompt length; the rendered prompt is within
        ``LENGTH_TOLERANCE`` of it.
    depth: where the needle sits in the filler, 0.0 (start) to 1.0 (end).
    """

    prompt_messages: list[dict]
    passkey: str
    context_tokens: int
    depth: float


def passkey_prompt_ids(*, tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and the assistant's cue."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def score_passkey(answer_text: str, passkey: str) -> bool:
    """True when ``passkey`` appears in ``answer_text`` as a number of its own.

    Digits inside a longer number do not count: "123456" does not answer "12345".
    """
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", answer_text) is not None


def _messages(*, filler_before: str, needle: str, filler_after: str) -> list[dict]:
    # Measured with SmolLM2-135M-Instruct, dense, greedy: tags that fence the text off from the
    # question, and the needle as a paragraph of its own, lift retrieval from 8/10 to 10/10
    # at 2K tokens and from 9/10 to 10/10 at 4K.
    haystack = f"{filler_before}\n\n{needle}\n\n{filler_after}".strip()
    content = f"{INSTRUCTION}\n\n<text>\n{haystack}\n</text>\n\n{QUESTION}"
    return [{"role": "user", "content": content}]


def _tidy(*, text: str) -> str:
    """Filler fit for the test: no digits, so the passkey is the prompt's only number (the
    texts hold ZIP codes and dates a model could answer with), and no indentation or
    blank-line runs, which make the prompt length jump where the filler is cut."""
    lines = (
        re.sub(r"[ \t]+", " ", re.sub(r"[0-9]", "", line)).strip() for line in text.splitlines()
    )
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _window(*, corpus: str, start: int, num_chars: int) -> str:
    """``num_chars`` characters of ``corpus`` from ``start``, wrapping around at the end."""
    repeats = -(-(start + num_chars) // len(corpus))
    return (corpus * repeats)[start : start + num_chars]


def _cut(*, tokenizer, text: str, num_tokens: int, snap: bool) -> tuple[str, str]:
    """Split ``text`` after its first ``num_tokens`` tokens.

    snap: move the split back to a line break (when within 2% of the text) or else a space,
        so an inserted paragraph cuts neither a line nor a word; without it the split is
        token-exact, which lets the prompt length be fitted to the token.
    """
    if num_tokens <= 0:
        return "", text
    # verbose=False: windows may outrun model_max_length; only the final prompt matters.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    if num_tokens >= len(offsets):
        return text, ""
    end = offsets[num_tokens][0]
    if snap:
        line = text.rfind("\n", 0, end)
        space = text.rfind(" ", 0, end)
        if line > 0 and end - line <= min(_MAX_SNAP_CHARS, len(text) // 50):
            end = line
        elif space > 0:
            end = space
    return text[:end].rstrip(), text[end:].lstrip()


def make_passkey_task(
    *, tokenizer, texts: Sequence[str], context_tokens: int, depth: float, seed: int
) -> PasskeyTask:
    """Build a passkey task whose rendered prompt is about ``context_tokens`` tokens long.

    tokenizer: a transformers tokenizer with a chat template (the model's own).
    texts: filler sources; a seeded random window of their concatenation (wrapping
        around if needed) is used, so any ``context_tokens`` is possible.
    context_tokens: target length of :func:`passkey_prompt_ids` of the result, within
        ``LENGTH_TOLERANCE`` (2%).
    depth: fraction of the filler tokens that precede the needle, in [0, 1].
    seed: fixes the passkey and the filler window.

    Raises:
        ValueError: depth outside [0, 1], no usable text, or ``context_tokens`` too small for
            the instructions, the needle and a little filler.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(
            f"depth must be in [0, 1] (fraction of the filler before the needle), got {depth}"
        )
    corpus = "\n\n".join(_tidy(text=t) for t in texts if t.strip())
    if len(corpus) < 1000:
        raise ValueError("texts must hold at least 1000 characters of filler; pass ensure_texts()")
    rng = random.Random(seed)
    passkey = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(passkey=passkey)

    skeleton = len(
        passkey_prompt_ids(
            tokenizer=tokenizer,
            messages=_messages(filler_before="", needle=needle, filler_after=""),
        )
    )
    minimum = skeleton + MIN_FILLER_TOKENS
    if context_tokens < minimum:
        raise ValueError(
            f"context_tokens={context_tokens} is too small to hold the instructions and the "
            f"needle ({skeleton} tokens) plus {MIN_FILLER_TOKENS} tokens of filler; "
            f"use context_tokens >= {minimum}"
        )

    # Start the window at a line start so the filler opens with whole words.
    start = rng.randrange(len(corpus))
    line = corpus.find("\n", start)
    start = line + 1 if 0 <= line < len(corpus) - 1 else 0

    filler_tokens = context_tokens - skeleton
    best: tuple[int, list[dict]] | None = None
    for _ in range(_FIT_ROUNDS):
        raw = _window(corpus=corpus, start=start, num_chars=filler_tokens * _CHARS_PER_TOKEN_BOUND)
        filler, _rest = _cut(tokenizer=tokenizer, text=raw, num_tokens=filler_tokens, snap=False)
        before, after = _cut(
            tokenizer=tokenizer, text=filler, num_tokens=round(depth * filler_tokens), snap=True
        )
        messages = _messages(filler_before=before, needle=needle, filler_after=after)
        error = len(passkey_prompt_ids(tokenizer=tokenizer, messages=messages)) - context_tokens
        if best is None or abs(error) < abs(best[0]):
            best = (error, messages)
        if abs(error) <= 1:
            break
        # Token counts change a little where the pieces are joined; correct and retry.
        filler_tokens = max(1, filler_tokens - error)
    error, messages = best
    if abs(error) > LENGTH_TOLERANCE * context_tokens + 1:
        raise ValueError(
            f"could not fit the filler to context_tokens={context_tokens} (off by {error} "
            "tokens); pass longer texts or a larger context_tokens"
        )
    return PasskeyTask(
        prompt_messages=messages, passkey=passkey, context_tokens=context_tokens, depth=depth
    )
