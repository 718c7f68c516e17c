"""Prompts to token ids and back, through transformers' AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

Prompt = str | list[int] | list[dict]


class Tokenizer:
    """Wraps a Hugging Face tokenizer; chat prompts go through its chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"could not load a tokenizer from {model_dir} ({error}); the directory needs "
                "the tokenizer files a Hugging Face model directory has (tokenizer.json, ...)"
            ) from error

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._tok.eos_token_id
        return () if eos is None else (int(eos),)

    def encode(self, prompt: Prompt, *, index: int = 0) -> list[int]:
        """A string (plain text), a list of ids (used as is) or chat messages.

        Raises ValueError for an empty prompt or a shape it does not know.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {index} is an empty string; give some text")
            return list(self._tok(prompt)["input_ids"])
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], dict)):
            if not prompt:
                raise ValueError(f"prompt {index} is an empty list; give text, ids or messages")
            if self._tok.chat_template is None:
                raise ValueError(
                    f"prompt {index} is a chat (list of messages) but this tokenizer has no "
                    "chat template; pass plain text instead"
                )
            ids = self._tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError(
            f"prompt {index} must be a string, a list of token ids or a list of chat messages "
            f"({{'role': ..., 'content': ...}}), got {type(prompt).__name__}"
        )

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self._tok(text)["input_ids"])
