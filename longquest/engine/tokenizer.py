"""Prompts to token ids and back, through transformers' AutoTokenizer."""

from __future__ import annotations

import json
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
        # Token ids a prompt may hold: the model's embedding rows (config.json's vocab_size,
        # often padded past the tokenizer's) or, without one, the tokenizer's own.
        self.vocab_size = max(len(self._tok), _config_vocab_size(Path(model_dir)))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._tok.eos_token_id
        return () if eos is None else (int(eos),)

    def encode(self, prompt: Prompt, *, index: int = 0) -> list[int]:
        """A string (plain text), a list of ids (used as is) or chat messages.

        Raises ValueError for an empty prompt, ids outside the vocabulary, a message
        without ``role`` or ``content``, or a shape it does not know.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {index} is an empty string; give some text")
            return list(self._tok(prompt)["input_ids"])
        if not isinstance(prompt, list) or not prompt:
            what = "an empty list" if isinstance(prompt, list) else f"a {type(prompt).__name__}"
            raise ValueError(
                f"prompt {index} is {what}; give a string, a list of token ids or a list of "
                "chat messages ({'role': ..., 'content': ...})"
            )
        if isinstance(prompt[0], dict):
            return self._encode_chat(prompt, index=index)
        for position, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int):
                raise ValueError(
                    f"prompt {index} is a list of token ids but holds {token!r} "
                    f"({type(token).__name__}) at position {position}; token ids are ints"
                )
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"prompt {index} has token id {token} at position {position}; the "
                    f"vocabulary is 0..{self.vocab_size - 1}"
                )
        return list(prompt)

    def _encode_chat(self, messages: list, *, index: int) -> list[int]:
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(
                    f"prompt {index} message {position} must be a dict with a string 'role' "
                    f"and 'content', got {message!r}"
                )
            if not isinstance(message.get("content"), (str, list)):
                raise ValueError(
                    f"prompt {index} message {position} has no 'content' (text); each message "
                    "is {'role': 'user', 'content': '...'}"
                )
        if self._tok.chat_template is None:
            raise ValueError(
                f"prompt {index} is a chat (list of messages) but this tokenizer has no "
                "chat template; pass plain text instead"
            )
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self._tok(text)["input_ids"])


def _config_vocab_size(model_dir: Path) -> int:
    """config.json's ``vocab_size`` (also under ``text_config``), or 0 when absent."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(config, dict):
        return 0
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else 0
