"""Validating a posted task dataset before any job is queued: every refusal names the row and the field."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import InvalidRequest, PayloadTooLarge

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ROW_FIELDS = {"prompt", "completion"}
IGNORED_FIELDS = {"label"}  # carried by benchmark files; not used for training


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str


def check_task_name(name: object, param: str = "name") -> str:
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise InvalidRequest(
            f"{param}: {name!r} is not a valid task name (lower-case letters, digits, '.', '_', '-'; "
            "1 to 64 characters; starting with a letter or digit; names starting with '@' are reserved)",
            param=param)
    return name


def parse_jsonl(data: bytes, *, max_rows: int, max_bytes: int) -> list[object]:
    """Decode a JSONL upload into raw row objects. Blank lines are skipped; the line number is 1-based."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"file: {len(data)} bytes, over the limit of {max_bytes}", param="file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InvalidRequest(f"file: line {line} is not valid UTF-8 (byte {e.start})", param="file") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(rows) >= max_rows:
            raise PayloadTooLarge(f"file: more than {max_rows} rows", param="file")
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidRequest(f"file: line {number} is not valid JSON ({e})", param=f"file.line{number}") from None
    return rows


def check_rows(raw: object, *, max_rows: int, param: str = "data") -> list[Row]:
    """Each row must be an object with string ``prompt`` and ``completion`` (``label`` is allowed, ignored)."""
    if not isinstance(raw, list):
        raise InvalidRequest(f"{param}: must be a list of rows", param=param)
    if not raw:
        raise InvalidRequest(f"{param}: no rows", param=param)
    if len(raw) > max_rows:
        raise PayloadTooLarge(f"{param}: {len(raw)} rows, over the limit of {max_rows}", param=param)
    rows = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: must be an object with 'prompt' and 'completion'", param=where)
        extra = set(item) - ROW_FIELDS - IGNORED_FIELDS
        if extra:
            raise InvalidRequest(f"{where}: unknown field {sorted(extra)[0]!r}", param=f"{where}.{sorted(extra)[0]}")
        for field in ("prompt", "completion"):
            value = item.get(field)
            if not isinstance(value, str):
                kind = "missing" if field not in item else f"a {type(value).__name__}, not a string"
                raise InvalidRequest(f"{where}.{field}: {kind}", param=f"{where}.{field}")
            if not value.strip():
                raise InvalidRequest(f"{where}.{field}: empty", param=f"{where}.{field}")
            if "\x00" in value:
                raise InvalidRequest(f"{where}.{field}: contains a NUL character", param=f"{where}.{field}")
        rows.append(Row(item["prompt"], item["completion"]))
    return rows


def check_lengths(rows: list[Row], tokenizer, max_seq_len: int, param: str = "data") -> None:
    """Every row (prompt, completion and end of sequence) must fit in ``max_seq_len`` tokens."""
    prompts = tokenizer([r.prompt for r in rows])["input_ids"]
    completions = tokenizer([r.completion for r in rows], add_special_tokens=False)["input_ids"]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c) + 1
        if n > max_seq_len:
            raise InvalidRequest(f"{param}[{i}]: {n} tokens (prompt, completion and end of sequence), over "
                                 f"max_seq_len {max_seq_len}", param=f"{param}[{i}]")
        if not c:
            raise InvalidRequest(f"{param}[{i}].completion: no tokens", param=f"{param}[{i}].completion")
