"""The output file of a batch job: verified before anything touches it, locked for the
whole job, appended one row at a time.

A results file holds one JSON object a line, each with ``id`` and either ``text`` (a
result) or ``error``. Several rows may share an id (``--retry-errors`` appends new
ones): the last row for an id is the one that counts. Ids are compared by their JSON
value, so ``7``, ``"7"`` and ``true`` are three different ids.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from longquest.launch.idtable import IdTable

# Every row this module writes starts with these bytes (``id`` is always the first key),
# so a torn last line of ours is a prefix of a line that starts with them.
ROW_PREFIX = b'{"id": '


def id_key(value: object) -> str:
    """The identity of a request id: its JSON text (``7`` and ``"7"`` differ)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


class ResultsFileError(ValueError):
    """The output file is not a results file this module can safely append to."""


def scan_results(
    handle: BinaryIO, *, path: Path, on_row: Callable[[dict], None]
) -> tuple[int, bool]:
    """Check every line of a results file read from ``handle`` (binary, at its start),
    one line at a time; change nothing. ``on_row`` gets each row in file order.

    Returns ``(bytes to keep, needs_newline)``: the bytes past ``keep`` are a torn last
    line (no final newline, not a whole row, starting like one of our rows), the only
    thing a caller may cut. ``needs_newline`` is True when the last line is whole but
    lacks its newline.

    Raises ResultsFileError naming the file and line when any other line is not a row.
    """
    size = 0
    for number, raw in enumerate(handle, start=1):
        if raw.endswith(b"\n"):
            size += len(raw)
            if raw.strip():
                on_row(_parse_row(raw[:-1], number=number, path=path, torn_ok=False))
            continue
        # The last line, without its newline.
        if not raw.strip():
            return size + len(raw), bool(raw)
        row = _parse_row(raw, number=number, path=path, torn_ok=True)
        if row is None:
            return size, False
        on_row(row)
        return size + len(raw), True
    return size, False


def parse_results(data: bytes, *, path: Path) -> tuple[dict[str, dict], int, bool]:
    """:func:`scan_results` of a file's bytes: ``(last row per id key, bytes to keep,
    needs_newline)``."""
    last: dict[str, dict] = {}

    def keep_last(row: dict) -> None:
        last[id_key(row["id"])] = row

    keep, needs_newline = scan_results(io.BytesIO(data), path=path, on_row=keep_last)
    return last, keep, needs_newline


def _parse_row(raw: bytes, *, number: int, path: Path, torn_ok: bool) -> dict | None:
    """One line as a row; None for a torn last line (only when ``torn_ok``)."""
    fix = (
        "nothing was changed. If it is a results file, fix or delete that line (a deleted "
        "row's id is served again); otherwise give --output a new file name"
    )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if torn_ok and raw.startswith(ROW_PREFIX):  # a crash cut a character in two
            return None
        raise ResultsFileError(
            f"output file {path} line {number} is not UTF-8 text ({error.reason} at byte "
            f"{error.start}), so it is not a longquest results file; {fix}"
        ) from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        if torn_ok and (raw.startswith(ROW_PREFIX) or ROW_PREFIX.startswith(raw)):
            return None
        raise ResultsFileError(
            f"output file {path} line {number} is not valid JSON ({error.msg} at column "
            f"{error.colno}), so it is not a longquest results file, or a write was torn "
            f"there; {fix}"
        ) from None
    if not isinstance(row, dict) or "id" not in row or not ("text" in row or "error" in row):
        raise ResultsFileError(
            f"output file {path} line {number} is not a result row (a JSON object with 'id' "
            f"and 'text' or 'error'), so it is not a longquest results file; {fix}"
        )
    return row


def read_results(path: str | Path) -> dict[str, dict]:
    """The last row per id key of a results file (empty if there is none), read only:
    a torn last line is ignored, not cut. Raises ResultsFileError as scan_results."""
    path = Path(path)
    if not path.exists():
        return {}
    _check_file(path)
    last: dict[str, dict] = {}

    def keep_last(row: dict) -> None:
        last[id_key(row["id"])] = row

    with open(path, "rb") as handle:
        scan_results(handle, path=path, on_row=keep_last)
    return last


def read_id_table(path: str | Path) -> IdTable:
    """The state of every id in a results file (:class:`IdTable`), read one line at a
    time without changing the file (a torn last line is ignored); empty when there is
    no file. Raises ResultsFileError as scan_results."""
    path, table = Path(path), IdTable()
    if path.exists():
        _check_file(path)
        with open(path, "rb") as handle:
            scan_results(handle, path=path, on_row=partial(_record, table))
    return table


def _record(table: IdTable, row: dict) -> None:
    table.record_row(id_key(row["id"]), error="error" in row)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ResultsFileError(f"output {path} is not a file (a directory?); give a file name")


def done_keys(last: dict[str, dict], *, retry_errors: bool) -> set[str]:
    """Ids not to serve again: all of them, or with ``retry_errors`` those whose last
    row is a result."""
    return {key for key, row in last.items() if not (retry_errors and "error" in row)}


def check_not_input(*, output_path: Path, input_path: Path) -> None:
    """Refuse an output that is the input file (also through a symlink or hard link)."""
    try:
        out, inp = os.stat(output_path), os.stat(input_path)
    except FileNotFoundError:
        return
    if (out.st_dev, out.st_ino) == (inp.st_dev, inp.st_ino):
        raise ResultsFileError(
            f"--output {output_path} is the input file {input_path}; results would be "
            "appended to the requests. Give --output a different file"
        )


class ResultsFile:
    """An exclusively locked results file: verified and repaired on open (a torn last
    line is cut, nothing else), then appended row by row, each forced to disk.
    ``ids`` holds the state of every id in the file as it was opened.

    The lock (``flock`` on the file itself) is held until ``close``; a second job on
    the same file fails at once. Raises ResultsFileError (a ValueError) for a file that
    is the input, a directory, not a results file, or locked.
    """

    def __init__(self, path: str | Path, *, input_path: str | Path) -> None:
        self.path = Path(path)
        check_not_input(output_path=self.path, input_path=Path(input_path))
        if self.path.is_dir():
            raise ResultsFileError(f"--output {self.path} is a directory; give a file name")
        # Append mode never changes existing bytes; it creates a missing file.
        self._handle = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            self._lock()
            self._handle.seek(0)
            self.ids = IdTable()
            on_row = partial(_record, self.ids)
            keep, needs_newline = scan_results(self._handle, path=self.path, on_row=on_row)
            if keep < self._handle.seek(0, os.SEEK_END):
                self._handle.truncate(keep)
            if needs_newline:
                self._handle.write(b"\n")
            self._sync()
        except BaseException:
            self._handle.close()
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsFileError(
                f"output file {self.path} is locked: another batch job is writing it. Wait "
                "for that job to finish (then rerun this one to resume), or give --output "
                "another file"
            ) from None

    def append(self, row: dict) -> None:
        """Write one row (``id`` first) and force it to disk before returning."""
        row = {"id": row["id"], **row}
        self._handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self._sync()

    def _sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Release the lock and the file."""
        self._handle.close()
