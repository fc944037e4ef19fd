"""The records of a `.json` or `.jsonl` file, each with the line it starts on.

A file whose first character (after whitespace) is `[` is one JSON list of records (LLaVA's usual `.json`);
any other is JSON Lines, one record per line, blank lines skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

_WHITESPACE = re.compile(r"\s*")


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read the file ({error})") from error
    records = _list_records(text, path) if text.lstrip().startswith("[") else _line_records(text, path)
    for line, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line}: a record must be a JSON object, got {type(record).__name__}")
        yield line, record


def _line_records(text: str, path: Path) -> Iterator[tuple[int, object]]:
    for line, content in enumerate(text.splitlines(), start=1):
        if content.strip():
            try:
                yield line, json.loads(content)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line}: not valid JSON ({error.msg}, column {error.colno})") from error


def _list_records(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """The elements of a JSON list, decoded one by one so that each keeps its line number."""
    decoder = json.JSONDecoder()
    position = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", position):
        return
    while True:
        line += text.count("\n", counted, position)
        counted = position
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from error
        yield line, record
        position = _WHITESPACE.match(text, position).end()
        if text.startswith("]", position):
            break
        if not text.startswith(",", position):
            line += text.count("\n", counted, position)
            raise UserError(f"{path}:{line}: not valid JSON (expected ',' or ']' after a record)")
        position = _WHITESPACE.match(text, position + 1).end()
    if text[position + 1 :].strip():
        raise UserError(f"{path}: not valid JSON (text after the closing ']')")
