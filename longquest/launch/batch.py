"""Batch inference over a JSONL file, resumable.

Input, one JSON object a line: ``id`` (string or number, unique), ``prompt`` (text)
or ``messages`` (chat, formatted by the model's chat template), and optional
sampling fields named as in :class:`SamplingParams` (``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``,
``logprobs``).

Output, one JSON object per input line: ``id``, ``text``, ``finish_reason``,
``prompt_tokens``, ``completion_tokens``, ``prefill_seconds``,
``decode_tokens_per_second``, ``pages_attended``, ``pages_total`` — or ``id`` and
``error`` for a line that could not be served (the job goes on).

Each result is appended and flushed to disk as soon as its group finishes.
Rerunning with the same output file resumes: ids already there are skipped, a
torn last line from a crash is dropped, nothing is written twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm import tqdm

from longquest.engine.config import SamplingParams
from longquest.engine.sequence import RequestOutput

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}

Generate = Callable[[list[list[int]], list[SamplingParams]], list[RequestOutput]]


@dataclass(frozen=True, kw_only=True)
class BatchItem:
    id: str
    token_ids: list[int]
    params: SamplingParams


def read_done_ids(output_path: Path) -> set[str]:
    """Ids already in the output; a torn last line (no newline: a crash) is cut off."""
    if not output_path.exists():
        return set()
    data = output_path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(output_path, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    done = set()
    for line in data.decode().splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


def parse_line(line: str, number: int, tokenizer) -> tuple[str, BatchItem | None, str | None]:
    """``(id, item, error)`` for one input line; exactly one of item and error is set."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"line-{number}", None, f"line {number} is not valid JSON: {error}"
    if not isinstance(record, dict):
        return f"line-{number}", None, f"line {number} must be a JSON object"
    raw_id = record.get("id")
    if raw_id is None or isinstance(raw_id, (dict, list)):
        return f"line-{number}", None, f"line {number} has no 'id' (string or number)"
    request_id = str(raw_id)
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        return request_id, None, "give exactly one of 'prompt' (text) or 'messages' (chat)"
    unknown = set(record) - {"id", "prompt", "messages"} - SAMPLING_FIELDS
    if unknown:
        return (
            request_id,
            None,
            f"unknown fields {sorted(unknown)}; sampling fields are "
            + (", ".join(sorted(SAMPLING_FIELDS))),
        )
    try:
        params = SamplingParams(**{k: v for k, v in record.items() if k in SAMPLING_FIELDS})
        prompt = record["prompt"] if has_prompt else record["messages"]
        if has_prompt and not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        if has_messages and not (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        ):
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        token_ids = tokenizer.encode(prompt, index=number)
    except (TypeError, ValueError) as error:
        return request_id, None, str(error)
    return request_id, BatchItem(id=request_id, token_ids=token_ids, params=params), None


def result_row(item: BatchItem, output: RequestOutput) -> dict:
    return {
        "id": item.id,
        "text": output.text,
        "finish_reason": output.finish_reason,
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": len(output.token_ids),
        "prefill_seconds": round(output.prefill_seconds, 4),
        "decode_tokens_per_second": round(output.decode_tokens_per_second, 2),
        "pages_attended": round(output.pages_attended, 2),
        "pages_total": round(output.pages_total, 2),
    }


class ResultWriter:
    """Appends rows and forces each to disk, so a crash loses at most the row in flight."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._handle = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, row: dict) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def run_batch(
    *,
    input_path: str | Path,
    output_path: str | Path,
    generate: Generate,
    tokenizer,
    group_size: int = 8,
    done_ids: set[str] | None = None,
    write: bool = True,
    progress: bool = True,
) -> dict:
    """Serve every not-yet-done line of ``input_path``; return a summary.

    generate: serves token-id prompts (the local engine, a Ray cluster, or one
        rank of a torchrun group — there only rank 0 passes ``write=True``).
    group_size: requests handed to ``generate`` at once (they decode as a batch).
    done_ids: ids already served, when the caller read them (torchrun ranks);
        otherwise they are read from ``output_path``.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist")
    done = read_done_ids(output_path) if done_ids is None else done_ids
    writer = ResultWriter(output_path, enabled=write)
    todo: list[BatchItem] = []
    errors = skipped = 0
    seen: set[str] = set()
    with open(input_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            request_id, item, error = parse_line(line, number, tokenizer)
            if request_id in done:
                skipped += 1
                continue
            if request_id in seen:
                item, error = None, f"duplicate id {request_id!r} (line {number})"
                request_id = f"{request_id}#line-{number}"
                if request_id in done:
                    continue
            seen.add(request_id)
            if error is not None:
                writer.write({"id": request_id, "error": error})
                errors += 1
            else:
                todo.append(item)
    bar = tqdm(total=len(todo), desc="batch", unit="req", disable=not progress)
    tokens, start = 0, time.perf_counter()
    try:
        for first in range(0, len(todo), group_size):
            group = todo[first : first + group_size]
            for _item, row in _serve(group, generate):
                writer.write(row)
                errors += "error" in row
                tokens += row.get("completion_tokens", 0)
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
    finally:
        bar.close()
        writer.close()
    return {"served": len(todo), "skipped": skipped, "errors": errors, "tokens": tokens}


def _serve(group: list[BatchItem], generate: Generate):
    """Rows for a group; if the group is refused (bad input), retry one by one so only
    the offending requests become error rows."""
    try:
        outputs = generate([i.token_ids for i in group], [i.params for i in group])
        yield from ((i, result_row(i, o)) for i, o in zip(group, outputs))
        return
    except ValueError as error:
        if len(group) == 1:
            yield group[0], {"id": group[0].id, "error": str(error)}
            return
    for item in group:
        try:
            (output,) = generate([item.token_ids], [item.params])
            yield item, result_row(item, output)
        except ValueError as error:
            yield item, {"id": item.id, "error": str(error)}
