"""Batch inference over a JSONL file, resumable.

Input, one JSON object a line: ``id`` (a JSON string, number or boolean, unique),
``prompt`` (text) or ``messages`` (chat, formatted by the model's chat template), and
optional sampling fields named as in :class:`SamplingParams` (``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``,
``logprobs``). The file is read as bytes and decoded line by line.

Output, one JSON object per input line: ``id`` (the input's JSON value), ``text``,
``finish_reason``, ``prompt_tokens``, ``completion_tokens``, ``prefill_seconds``,
``decode_tokens_per_second``, ``pages_attended``, ``pages_total`` -- or ``id`` and
``error`` for a line that could not be served (the job goes on). A line with no usable
id (not JSON, not UTF-8, no ``id``) gets the id ``"line-N"``; a later line repeating an
earlier line's id gets an error row with the id ``"<id>#line-N"``.

The output file is checked before anything is written (see longquest.launch.results),
locked for the whole job, and each row is forced to disk as soon as it exists.
Rerunning with the same output resumes: ids already there are skipped (with
``retry_errors``, ids whose last row is an error are served again and get a new row;
the last row for an id wins), a torn last line from a crash is dropped, nothing else
in the file is changed.

Errors: a ValueError from the engine is the request's own fault and becomes its error
row. Any other exception is the request's only if the engine still serves a one-token
probe right after it (then the row says "internal error" and a warning is printed);
otherwise (a dead worker, a broken device) the job stops with that exception and
writes no row for the request, so a rerun serves it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm import tqdm

from longquest.engine.config import SamplingParams
from longquest.engine.sequence import RequestOutput
from longquest.launch.results import (
    ResultsFile,
    check_not_input,
    done_keys,
    id_key,
    read_results,
)

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}

Generate = Callable[[list[list[int]], list[SamplingParams]], list[RequestOutput]]


@dataclass(frozen=True, kw_only=True)
class BatchItem:
    id: object  # the id's JSON value, written back unchanged
    line: int
    token_ids: list[int]
    params: SamplingParams


def read_done_ids(output_path: str | Path, *, retry_errors: bool = False) -> set[str]:
    """Keys (:func:`id_key`) of the ids not to serve again, read without changing the
    file (a torn last line is ignored); empty when there is no file."""
    return done_keys(read_results(output_path), retry_errors=retry_errors)


def _name_request(message: str, *, request_id: object, line: int) -> str:
    """Engine and tokenizer messages say ``prompt N`` (a position); say which line."""
    name = f"request id={json.dumps(request_id, ensure_ascii=False)} (input line {line})"
    return re.sub(r"\bprompt \d+\b", name, message, count=1)


def parse_line(raw: bytes, number: int, tokenizer) -> tuple[object, BatchItem | None, str | None]:
    """``(id, item, error)`` for one input line; exactly one of item and error is set.
    A line without a usable id gets the id ``"line-<number>"``."""
    line_id = f"line-{number}"
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        reason = f"{error.reason} at byte {error.start}"
        return line_id, None, f"line {number} is not UTF-8 text ({reason}); save it as UTF-8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return line_id, None, f"line {number} is not valid JSON: {error}"
    if not isinstance(record, dict):
        return line_id, None, f"line {number} must be a JSON object"
    request_id = record.get("id")
    if request_id is None or isinstance(request_id, (dict, list)):
        return line_id, None, f"line {number} has no 'id' (a string, number or boolean)"
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        return request_id, None, "give exactly one of 'prompt' (text) or 'messages' (chat)"
    unknown = set(record) - {"id", "prompt", "messages"} - SAMPLING_FIELDS
    if unknown:
        known = ", ".join(sorted(SAMPLING_FIELDS))
        return request_id, None, f"unknown fields {sorted(unknown)}; sampling fields are {known}"
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
        return request_id, None, _name_request(str(error), request_id=request_id, line=number)
    item = BatchItem(id=request_id, line=number, token_ids=token_ids, params=params)
    return request_id, item, None


def result_row(item: BatchItem, output: RequestOutput) -> dict:
    return {
        "id": item.id,
        "text": output.text,
        "finish_reason": output.finish_reason,
        "prompt_tokens": len(output.prompt_token_ids),
        "cached_prompt_tokens": output.cached_prompt_tokens,
        "completion_tokens": len(output.token_ids),
        "prefill_seconds": round(output.prefill_seconds, 4),
        "decode_tokens_per_second": round(output.decode_tokens_per_second, 2),
        "pages_attended": round(output.pages_attended, 2),
        "pages_total": round(output.pages_total, 2),
    }


def check_group_size(group_size: object) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"--group-size (group_size) must be a whole number >= 1 (requests decoded "
            f"together; 8 by default), got {group_size!r}"
        )


def read_requests(
    input_path: Path, tokenizer, done: set[str]
) -> tuple[list[BatchItem], list[dict], int]:
    """``(items to serve, error rows for bad lines, lines skipped as done)``."""
    todo: list[BatchItem] = []
    error_rows: list[dict] = []
    skipped = 0
    first_line: dict[str, int] = {}
    with open(input_path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            request_id, item, error = parse_line(raw, number, tokenizer)
            key = id_key(request_id)
            if key in first_line:
                shown = json.dumps(request_id, ensure_ascii=False)
                item = None
                error = (
                    f"duplicate id {shown} (first on line {first_line[key]}); ids must be "
                    "unique, so this line is not served: give it a new id"
                )
                request_id = f"{request_id if isinstance(request_id, str) else key}#line-{number}"
                key = id_key(request_id)
            first_line.setdefault(key, number)
            if key in done:
                skipped += 1
            elif error is not None:
                error_rows.append({"id": request_id, "line": number, "error": error})
            else:
                todo.append(item)
    return todo, error_rows, skipped


def check_batch_files(
    *, input_path: str | Path, output_path: str | Path, group_size: int = 8
) -> None:
    """The checks run_batch makes before serving, touching no file, so a launcher can
    fail before it loads the model. Raises ValueError as run_batch does (the lock is
    taken, and checked, by run_batch)."""
    check_group_size(group_size)
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist")
    check_not_input(output_path=output_path, input_path=input_path)
    read_results(output_path)


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
    retry_errors: bool = False,
) -> dict:
    """Serve every not-yet-done line of ``input_path``; return a summary: ``served``
    (result rows written), ``errors`` (error rows written), ``skipped`` (lines already
    done), ``tokens`` (completion tokens).

    generate: serves token-id prompts (the local engine, a Ray cluster, or one
        rank of a torchrun group -- there only rank 0 passes ``write=True``).
    group_size: requests handed to ``generate`` at once (they decode as a batch).
    done_ids: keys (:func:`read_done_ids`) of ids already served, when the caller read
        them (torchrun ranks); otherwise they are read from ``output_path``.
    retry_errors: serve again the ids whose last row is an error.

    Raises ValueError for a bad group_size, a missing input, or an output file that
    is the input, not a results file, or locked by another job (nothing is changed);
    RuntimeError when ``done_ids`` disagrees with the file once it is locked.
    """
    check_group_size(group_size)
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist")
    results = ResultsFile(output_path, input_path=input_path) if write else None
    try:
        if results is not None:
            done = done_keys(results.last, retry_errors=retry_errors)
            if done_ids is not None and done != done_ids:
                raise RuntimeError(
                    f"{output_path} changed between reading it and locking it; rerun the job"
                )
        elif done_ids is not None:
            done = done_ids
        else:
            done = read_done_ids(output_path, retry_errors=retry_errors)
        todo, error_rows, skipped = read_requests(input_path, tokenizer, done)
        summary = {"served": 0, "errors": len(error_rows), "skipped": skipped, "tokens": 0}
        for row in error_rows:
            if results is not None:
                results.append(row)
        _serve_all(todo, generate, results, group_size, summary, progress)
    finally:
        if results is not None:
            results.close()
    return summary


def _serve_all(todo, generate, results, group_size, summary, progress) -> None:
    bar = tqdm(total=len(todo), desc="batch", unit="req", disable=not progress)
    start = time.perf_counter()
    try:
        for first in range(0, len(todo), group_size):
            for row in _serve(todo[first : first + group_size], generate):
                if results is not None:
                    results.append(row)
                if "error" in row:
                    summary["errors"] += 1
                else:
                    summary["served"] += 1
                    summary["tokens"] += row["completion_tokens"]
                bar.update(1)
                rate = summary["tokens"] / (time.perf_counter() - start)
                bar.set_postfix(tok_s=f"{rate:.1f}")
    finally:
        bar.close()


def _serve(group: list[BatchItem], generate: Generate) -> Iterator[dict]:
    """Rows for a group, in order. If the group fails as a whole, its members are
    served one at a time, so only the requests at fault get error rows."""
    if len(group) > 1:
        try:
            outputs = generate([i.token_ids for i in group], [i.params for i in group])
        except ValueError:
            pass
        except Exception:
            if not _engine_serves(generate, group[0]):
                raise
        else:
            yield from (result_row(i, o) for i, o in zip(group, outputs, strict=True))
            return
    for item in group:
        yield _serve_one(item, generate)


def _serve_one(item: BatchItem, generate: Generate) -> dict:
    try:
        (output,) = generate([item.token_ids], [item.params])
    except ValueError as error:  # the request's own fault, refused before any work
        message = _name_request(str(error), request_id=item.id, line=item.line)
        return {"id": item.id, "error": message}
    except Exception as error:
        if not _engine_serves(generate, item):
            raise  # not this request's fault: no row, a rerun serves it
        message = (
            f"internal error while serving this request ({type(error).__name__}: {error}); "
            "the engine served other work right after it, so it is this request's. Rerun "
            "with --retry-errors to try it again"
        )
        print(f"[longquest] request id={item.id!r}: {message}", file=sys.stderr)
        return {"id": item.id, "error": message}
    return result_row(item, output)


def _engine_serves(generate: Generate, item: BatchItem) -> bool:
    """Whether the engine still serves a one-token request (the item's first token)."""
    try:
        generate([item.token_ids[:1]], [SamplingParams(max_tokens=1)])
    except Exception:  # noqa: BLE001 - any failure means the engine is unusable
        return False
    return True
