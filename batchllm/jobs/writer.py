"""Append-only, synced result writer, and the resume index of an existing output file.

A result is one JSON line, written with a single write call. Lines are flushed and fsynced every `sync_every` lines
or `sync_interval_s` seconds, whichever comes first, so a crash loses at most that many finished results; a torn
last line (a crash in the middle of a write) is cut off by `recover` and its request is computed again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batchllm.jobs.openai_output import line_no_of_output_id


class CorruptOutput(Exception):
    """The output file holds a broken line that is not the last one: it is not ours or was edited."""


@dataclass
class ResumeIndex:
    """What an existing output file already holds. `custom_ids`: ids with a line; `error_lines`: input line numbers
    of error lines written without a custom_id (unparsable lines, duplicates)."""

    custom_ids: set[str] = field(default_factory=set)
    error_lines: set[int] = field(default_factory=set)
    num_lines: int = 0
    num_errors: int = 0
    truncated_bytes: int = 0

    def add(self, record: dict) -> None:
        """Records one output line in the index."""
        self.num_lines += 1
        if record.get("error") is not None:
            self.num_errors += 1
        cid = record.get("custom_id")
        if isinstance(cid, str):
            self.custom_ids.add(cid)
        else:
            line_no = line_no_of_output_id(record.get("id"))
            if line_no is not None:
                self.error_lines.add(line_no)


def recover(path: str | Path) -> ResumeIndex:
    """Reads an existing output file into a ResumeIndex. Changes the file: a torn or unparsable last line is
    truncated away (back to the end of the last complete line). Raises CorruptOutput for a broken line elsewhere."""
    index = ResumeIndex()
    if str(path) == "-":  # streamed to standard output: nothing to resume
        return index
    path = Path(path)
    if not path.exists():
        return index
    good_end = 0  # byte offset just after the last complete line
    pending_bad: int | None = None  # line number of a broken line, fatal unless it is the last
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if pending_bad is not None:
                raise CorruptOutput(f"{path}: line {pending_bad} is not a complete JSON line")
            record = _parse_complete(raw)
            if record is None:
                pending_bad = n
                continue
            index.add(record)
            good_end += len(raw)
        size = f.seek(0, os.SEEK_END)
    if size > good_end:
        index.truncated_bytes = size - good_end
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return index


def _parse_complete(raw: bytes) -> dict | None:
    """The record of one complete output line (newline-terminated, a JSON object with "id"), else None."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


def encode_line(record: dict) -> bytes:
    """One JSON line, UTF-8. A string holding a lone surrogate (legal in JSON, e.g. "\\ud800" from half an emoji)
    cannot be UTF-8: such a record is written with ASCII escapes, which read back as the same strings."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


class ResultWriter:
    """Appends JSON lines to a file (or streams them to standard output for the path "-"); flushes and fsyncs in
    small batches. Use as a context manager or call close()."""

    def __init__(self, path: str | Path, sync_every: int = 32, sync_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = str(path) == "-"
        self.path = Path(path)
        if self.stream:
            self._f = os.fdopen(os.dup(1), "wb")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab")
        self._sync_every = max(1, sync_every)
        self._sync_interval_s = sync_interval_s
        self._clock = clock
        self._unsynced = 0
        self._last_sync = clock()
        self.lines_written = 0
        self.syncs = 0

    def write(self, record: dict) -> None:
        """Appends one record as a JSON line; syncs when the batch is full or old enough."""
        self._f.write(encode_line(record))
        self.lines_written += 1
        self._unsynced += 1
        if self._unsynced >= self._sync_every or self._clock() - self._last_sync >= self._sync_interval_s:
            self.sync()

    def sync(self) -> None:
        """Flushes buffered lines and fsyncs the file."""
        if self._unsynced:
            self._f.flush()
            if not self.stream:
                os.fsync(self._f.fileno())
            self.syncs += 1
            self._unsynced = 0
        self._last_sync = self._clock()

    def close(self) -> None:
        """Syncs and closes the file (idempotent)."""
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
