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

The file is streamed: lines are read as bytes and parsed and tokenized only as they
enter a bounded look-ahead window (longquest.launch.lookahead), which issues lines that
share a prompt prefix back to back so a document is prefilled once while it is cached.
Up to ``group_size`` requests are in the engine at once, and a finished request's slot
goes to the next line in the very next engine step (longquest.launch.stream). Memory is
bounded by the window, plus 16-24 bytes for each id in the file and the results
(longquest.launch.idtable), not by the file's size.

The output file is checked before anything is written (see longquest.launch.results),
locked for the whole job, and each row is forced to disk as soon as its request
finishes (rows come in finish order, not file order). Rerunning with the same output
resumes: ids already there are skipped (with ``retry_errors``, ids whose last row is
an error are served again and get a new row; the last row for an id wins), a torn
last line from a crash is dropped, nothing else in the file is changed.

Errors: a ValueError from the engine is the request's own fault and becomes its error
row. When an engine step fails, what was in flight is served again one request at a
time. Any other exception is the request's only if the engine still serves a one-token
probe right after it (then the row says "internal error" and a warning is printed);
otherwise (a dead worker, a broken device) the job stops with that exception and
writes no row for the request, so a rerun serves it.
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm

from longquest.engine.config import SamplingParams
from longquest.engine.sequence import RequestOutput
from longquest.launch.idtable import IdTable
from longquest.launch.lookahead import Lookahead
from longquest.launch.results import (
    ResultsFile,
    check_not_input,
    done_keys,
    id_key,
    read_id_table,
    read_results,
)
from longquest.launch.stream import (
    BatchItem,
    Feeder,
    Generate,
    Step,
    name_request,
    steps_from_generate,
)

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
# Prompt tokens the look-ahead window may hold (4 bytes each): bounds its memory when
# lines are long documents.
LOOKAHEAD_TOKENS = 1 << 24


def read_done_ids(output_path: str | Path, *, retry_errors: bool = False) -> set[str]:
    """Keys (:func:`id_key`) of the ids not to serve again, read without changing the
    file (a torn last line is ignored); empty when there is no file. For small files:
    a job keeps them in an :class:`IdTable` (:func:`read_id_table`)."""
    return done_keys(read_results(output_path), retry_errors=retry_errors)


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
        return request_id, None, name_request(str(error), request_id=request_id, line=number)
    item = BatchItem(id=request_id, line=number, token_ids=array("i", token_ids), params=params)
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


def check_lookahead(lookahead: object) -> None:
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(
            f"--lookahead (lookahead) must be a whole number >= 1 (lines parsed ahead to "
            f"group shared prefixes; 256 by default), got {lookahead!r}"
        )


def read_items(
    input_path: Path,
    tokenizer,
    *,
    ids: IdTable,
    retry_errors: bool,
    write: Callable[[dict], None],
    summary: dict,
) -> Iterator[BatchItem]:
    """The lines to serve, parsed one at a time as they are asked for. Bad lines go to
    ``write`` as error rows, lines already done are counted in ``summary["skipped"]``;
    ``ids`` records each id's first line (a later line with the same id is an error)."""
    with open(input_path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            request_id, item, error = parse_line(raw, number, tokenizer)
            key = id_key(request_id)
            first = ids.first_seen(key, line=number)
            if first != number:
                shown = json.dumps(request_id, ensure_ascii=False)
                item = None
                error = (
                    f"duplicate id {shown} (first on line {first}); ids must be "
                    "unique, so this line is not served: give it a new id"
                )
                request_id = f"{request_id if isinstance(request_id, str) else key}#line-{number}"
                key = id_key(request_id)
                ids.first_seen(key, line=number)
            if ids.is_done(key, retry_errors=retry_errors):
                summary["skipped"] += 1
            elif error is not None:
                write({"id": request_id, "line": number, "error": error})
            else:
                yield item


def check_batch_files(
    *, input_path: str | Path, output_path: str | Path, group_size: int = 8, lookahead: int = 256
) -> None:
    """The checks run_batch makes before serving, touching no file, so a launcher can
    fail before it loads the model. Raises ValueError as run_batch does (the lock is
    taken, and checked, by run_batch)."""
    check_group_size(group_size)
    check_lookahead(lookahead)
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist")
    check_not_input(output_path=output_path, input_path=input_path)
    read_id_table(output_path)


def run_batch(
    *,
    input_path: str | Path,
    output_path: str | Path,
    tokenizer,
    generate: Generate | None = None,
    step: Step | None = None,
    replicas=None,
    group_size: int = 8,
    lookahead: int = 256,
    done_ids: IdTable | None = None,
    write: bool = True,
    progress: bool = True,
    retry_errors: bool = False,
) -> dict:
    """Serve every not-yet-done line of ``input_path``; return a summary: ``served``
    (result rows written), ``errors`` (error rows written), ``skipped`` (lines already
    done), ``tokens`` (completion tokens).

    step: advances the engine by one step with new requests (a local
        :class:`~longquest.engine.scheduler.Scheduler`'s ``step``, ``LLM.step``, or one
        rank's scheduler under torchrun -- there only rank 0 passes ``write=True``).
    generate: instead of ``step``, a blocking ``generate(prompts, params)``; each
        group of up to ``group_size`` requests is then served to the end together.
    replicas: instead of ``step``, data-parallel Ray replicas (``LLM.replicas``, a
        :class:`~longquest.launch.replicas.ReplicaSet`) fed from one shared queue
        (longquest.launch.dispatch); the summary then also has ``replicas`` (one
        ``ReplicaStats.summary`` each), ``prefill_tokens`` (prompt tokens computed, not
        taken from a prefix cache) and ``wall_s``.
    group_size: requests in the engine (on each replica) at once, decoded as a batch; a
        finished one's slot is refilled in the next step.
    lookahead: lines parsed ahead of the engine, among which lines sharing a prompt
        prefix with the last one issued go first (at most ``LOOKAHEAD_TOKENS`` prompt
        tokens, and at least one line).
    done_ids: the ids already served (:func:`read_id_table` of the output), when the
        caller read them (torchrun ranks); otherwise they are read from ``output_path``.
    retry_errors: serve again the ids whose last row is an error.

    Raises ValueError for a bad group_size or lookahead, a missing input, or an output
    file that is the input, not a results file, or locked by another job (nothing is
    changed); RuntimeError when ``done_ids`` disagrees with the file once it is locked.
    """
    if sum(seam is not None for seam in (generate, step, replicas)) != 1:
        raise ValueError("give run_batch one of step=, generate= or replicas=")
    check_group_size(group_size)
    check_lookahead(lookahead)
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist")
    results = ResultsFile(output_path, input_path=input_path) if write else None
    rows = _Rows(results, progress=progress)
    try:
        if results is not None:
            ids = results.ids
            if done_ids is not None and done_ids != ids:
                raise RuntimeError(
                    f"{output_path} changed between reading it and locking it; rerun the job"
                )
        else:
            ids = done_ids if done_ids is not None else read_id_table(output_path)
        items = read_items(
            input_path, tokenizer, ids=ids, retry_errors=retry_errors, write=rows.write,
            summary=rows.summary,
        )  # fmt: skip
        if replicas is not None:
            _serve_on_replicas(replicas, items, rows, group_size=group_size, lookahead=lookahead,
                               progress=progress)  # fmt: skip
            return rows.summary
        window = Lookahead(
            items, tokens_of=lambda item: item.token_ids, size=lookahead,
            max_tokens=LOOKAHEAD_TOKENS,
        )  # fmt: skip
        step = step if step is not None else steps_from_generate(generate)
        feeder = Feeder(
            step=step, pick=window.pick, row_of=result_row, write=rows.write, limit=group_size
        )
        feeder.run()
    finally:
        rows.close()
    return rows.summary


def _serve_on_replicas(
    replicas, items: Iterator[BatchItem], rows: _Rows, *, group_size: int, lookahead: int,
    progress: bool,
) -> None:  # fmt: skip
    """Serve ``items`` on ``replicas``' clusters from one shared queue; the replicas'
    figures go into ``rows.summary``."""
    from longquest.launch.dispatch import ReplicaFeeder
    from longquest.launch.routing import SharedQueue

    queue = SharedQueue(
        items, tokens_of=lambda item: item.token_ids, replicas=len(replicas.clusters),
        size=lookahead, max_tokens=LOOKAHEAD_TOKENS,
    )  # fmt: skip
    feeder = ReplicaFeeder(
        clusters=replicas.clusters, queue=queue, row_of=result_row, write=rows.write,
        limit=group_size, progress=progress,
    )  # fmt: skip
    per_replica = feeder.run()
    rows.summary["prefill_tokens"] = sum(r["prefill_tokens"] for r in per_replica)
    rows.summary["wall_s"] = round(time.perf_counter() - rows.start, 3)
    rows.summary["replicas"] = per_replica


class _Rows:
    """Writes each row (forced to disk), counts it in the summary, shows progress."""

    def __init__(self, results: ResultsFile | None, *, progress: bool) -> None:
        self.results = results
        self.summary = {"served": 0, "errors": 0, "skipped": 0, "tokens": 0}
        self.bar = tqdm(desc="batch", unit="line", disable=not progress)
        self.start = time.perf_counter()

    def write(self, row: dict) -> None:
        if self.results is not None:
            self.results.append(row)
        if "error" in row:
            self.summary["errors"] += 1
        else:
            self.summary["served"] += 1
            self.summary["tokens"] += row["completion_tokens"]
        self.bar.update(1)
        rate = self.summary["tokens"] / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{rate:.1f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.results is not None:
            self.results.close()
