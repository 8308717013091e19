"""Validating a posted task dataset before any job is queued: every refusal names the row and the field.

Datasets are parsed one row at a time (a JSONL upload line by line from its spooled file, a JSON body element by
element of its ``data`` array) and each row is checked and reduced to its two strings at once, so that a dataset
never exists as a tree of Python dicts: checking a 6 MB JSON dataset, its length check included, peaks at 2.7x its
size (16 MB, traced), where json.loads of the whole body and every row's tokens at once took 19x. The parsers are
plain functions meant to run off the event loop (``run_in_threadpool``); each row is a separate decoder call,
so the serving thread gets the GIL between rows."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

from adapters_store import TASK_NAME_RULE, is_task_name

from .errors import InvalidRequest, PayloadTooLarge

ROW_FIELDS = ("prompt", "completion")
LABEL_TYPES = (str, int, float, bool, type(None))  # ``label``: carried by benchmark files, not used for training
TASK_FIELDS = ("name", "data", "config")
LENGTH_CHUNK = 64  # rows tokenized per call of the length check (see check_lengths)
_WS = re.compile(r"[ \t\n\r]*")


class Row(NamedTuple):
    prompt: str
    completion: str


class Rows(Sequence[Row]):
    """Checked rows, kept as two lists of strings. No object per row: 100,000 rows that the garbage collector
    tracks set off full collections while a dataset is checked, each a pause of the whole server (about 0.2 s
    with the model loaded)."""

    __slots__ = ("prompts", "completions")

    def __init__(self, prompts: list[str] | None = None, completions: list[str] | None = None):
        self.prompts, self.completions = prompts or [], completions or []

    def append(self, row: Row) -> None:
        self.prompts.append(row.prompt)
        self.completions.append(row.completion)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self.prompts[i], self.completions[i])
        return Row(self.prompts[i], self.completions[i])

    def __iter__(self) -> Iterator[Row]:
        return map(Row, self.prompts, self.completions)


@dataclass(frozen=True, slots=True)
class TaskPayload:
    """A posted task: its name and config as sent (checked by the caller), its rows checked."""
    name: object
    rows: Rows
    config: object


def _kind(value: object) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def check_task_name(name: object, param: str = "name") -> str:
    """The one task-name rule of ``adapters_store`` (matched in full: ``"abc\\n"`` is refused), as a 422."""
    if not isinstance(name, str):
        raise InvalidRequest(f"{param}: must be a string, not {_kind(name)}", param=param)
    if not is_task_name(name):
        raise InvalidRequest(f"{param}: {name!r} is not a valid task name ({TASK_NAME_RULE})", param=param)
    return name


def check_row(item: object, where: str) -> Row:
    """One row: an object with non-empty string ``prompt`` and ``completion`` (no NUL characters) and, optionally,
    a ``label`` that is a string, number, boolean or null (accepted and ignored); any other field or type is
    refused naming ``where`` and the field."""
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: must be an object with 'prompt' and 'completion'", param=where)
    for field in item:
        if field not in ROW_FIELDS and field != "label":
            raise InvalidRequest(f"{where}: unknown field {field!r}", param=f"{where}.{field}")
    if not isinstance(item.get("label"), LABEL_TYPES):
        raise InvalidRequest(f"{where}.label: must be a string, number, boolean or null, not "
                             f"{_kind(item['label'])}", param=f"{where}.label")
    for field in ROW_FIELDS:
        value = item.get(field)
        if not isinstance(value, str):
            kind = "missing" if field not in item else f"{_kind(value)}, not a string"
            raise InvalidRequest(f"{where}.{field}: {kind}", param=f"{where}.{field}")
        if not value.strip():
            raise InvalidRequest(f"{where}.{field}: empty", param=f"{where}.{field}")
        if "\x00" in value:
            raise InvalidRequest(f"{where}.{field}: contains a NUL character", param=f"{where}.{field}")
    return Row(item["prompt"], item["completion"])


def check_rows(raw: object, *, max_rows: int, param: str = "data") -> Rows:
    """A parsed list of rows, each checked by ``check_row``."""
    if not isinstance(raw, list):
        raise InvalidRequest(f"{param}: must be a list of rows, not {_kind(raw)}", param=param)
    if not raw:
        raise InvalidRequest(f"{param}: no rows", param=param)
    if len(raw) > max_rows:
        raise PayloadTooLarge(f"{param}: {len(raw)} rows, over the limit of {max_rows}", param=param)
    rows = Rows()
    for i, item in enumerate(raw):
        rows.append(check_row(item, f"{param}[{i}]"))
    return rows


def parse_jsonl(source: bytes | BinaryIO, *, max_rows: int, max_bytes: int, param: str = "file") -> Rows:
    """Decode and check a JSONL upload (bytes, or a binary file read from where it is) one line at a time.
    Blank lines are skipped; errors name the line (1-based) for encoding and JSON, the row (0-based over the
    rows, ``file[3].prompt``) for its fields."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise PayloadTooLarge(f"{param}: {len(source)} bytes, over the limit of {max_bytes}", param=param)
        lines = iter(source.splitlines(keepends=True))
    else:
        lines = iter(lambda: source.readline(max_bytes + 1), b"")
    rows = Rows()
    seen = 0
    for number, raw in enumerate(lines, start=1):
        start, seen = seen, seen + len(raw)
        if seen > max_bytes:
            raise PayloadTooLarge(f"{param}: over the limit of {max_bytes} bytes", param=param)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{param}: line {number} is not valid UTF-8 (byte {start + e.start})",
                                 param=param) from None
        if not line.strip():
            continue
        if len(rows) >= max_rows:
            raise PayloadTooLarge(f"{param}: more than {max_rows} rows", param=param)
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidRequest(f"{param}: line {number} is not valid JSON ({e})",
                                 param=f"{param}.line{number}") from None
        rows.append(check_row(item, f"{param}[{len(rows)}]"))
    if not rows:
        raise InvalidRequest(f"{param}: no rows", param=param)
    return rows


def parse_task_json(body: bytes, *, max_rows: int) -> TaskPayload:
    """Parse ``{"name": ..., "data": [rows], "config": {...}}``: the top-level object by hand, each element of
    ``data`` by its own decoder call and checked at once (``check_row``). Unknown or repeated fields, invalid
    JSON and a non-object body are refused naming the field (or ``body``)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"body: not valid UTF-8 (byte {e.start})", param="body") from None
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        return _WS.match(text, pos).end()

    def expect(pos: int, chars: str, what: str) -> int:
        pos = skip(pos)
        if text[pos:pos + 1] not in chars or pos >= len(text):
            raise InvalidRequest(f"body: not valid JSON (expecting {what} at char {pos})", param="body")
        return pos

    def value(pos: int):
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"body: not valid JSON ({e})", param="body") from None
        except RecursionError:
            raise InvalidRequest(f"body: not valid JSON (nested too deeply at char {pos})", param="body") from None

    pos = skip(0)
    if text[pos:pos + 1] != "{":
        raise InvalidRequest("body: must be a JSON object with name, data and config", param="body")
    fields: dict[str, object] = {}
    pos = skip(pos + 1)
    if text[pos:pos + 1] == "}":
        pos += 1
    else:
        while True:
            pos = expect(pos, '"', "a field name")
            key, pos = value(pos)
            if key not in TASK_FIELDS:
                raise InvalidRequest(f"{key}: unknown field", param=key)
            if key in fields:
                raise InvalidRequest(f"{key}: given twice", param=key)
            pos = skip(expect(pos, ":", "':'") + 1)
            if key == "data" and text[pos:pos + 1] == "[":
                fields[key], pos = _rows(text, pos, value, skip, expect, max_rows)
            else:
                fields[key], pos = value(pos)
            pos = expect(pos, ",}", "',' or '}'")
            pos += 1
            if text[pos - 1] == "}":
                break
    if skip(pos) != len(text):
        raise InvalidRequest(f"body: not valid JSON (extra data at char {skip(pos)})", param="body")
    if "name" not in fields:
        raise InvalidRequest("name: missing", param="name")
    if "data" not in fields:
        raise InvalidRequest("data: missing (a list of rows)", param="data")
    rows = fields["data"]
    if not isinstance(rows, Rows):
        rows = check_rows(rows, max_rows=max_rows)
    if not rows:
        raise InvalidRequest("data: no rows", param="data")
    return TaskPayload(fields["name"], rows, fields.get("config"))


def _rows(text: str, pos: int, value, skip, expect, max_rows: int) -> tuple[Rows, int]:
    """The ``data`` array starting at ``text[pos] == '['``, element by element."""
    rows = Rows()
    pos = skip(pos + 1)
    if text[pos:pos + 1] == "]":
        return rows, pos + 1
    while True:
        if len(rows) >= max_rows:
            raise PayloadTooLarge(f"data: more than {max_rows} rows", param="data")
        item, pos = value(pos)
        rows.append(check_row(item, f"data[{len(rows)}]"))
        pos = expect(pos, ",]", "',' or ']'")
        if text[pos] == "]":
            return rows, pos + 1
        pos = skip(pos + 1)


def check_lengths(rows: Sequence[Row], tokenizer, max_seq_len: int, param: str = "data") -> None:
    """Every row (prompt, completion and end of sequence) must fit in ``max_seq_len`` tokens. Tokenized
    ``LENGTH_CHUNK`` rows at a time: the token lists of a large dataset never exist all at once, and too few live
    through a collection to set off a full one (see ``Rows``)."""
    for start in range(0, len(rows), LENGTH_CHUNK):
        part = rows[start:start + LENGTH_CHUNK]
        prompts = tokenizer([r.prompt for r in part])["input_ids"]
        completions = tokenizer([r.completion for r in part], add_special_tokens=False)["input_ids"]
        for i, (p, c) in enumerate(zip(prompts, completions), start=start):
            n = len(p) + len(c) + 1
            if n > max_seq_len:
                raise InvalidRequest(f"{param}[{i}]: {n} tokens (prompt, completion and end of sequence), over "
                                     f"max_seq_len {max_seq_len}", param=f"{param}[{i}]")
            if not c:
                raise InvalidRequest(f"{param}[{i}].completion: no tokens", param=f"{param}[{i}].completion")
