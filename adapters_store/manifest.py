"""Task names and manifest.json: what put() writes and what readers accept."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone

from .errors import CorruptAdapter, InvalidTaskName, UnsupportedFormat

FORMAT_VERSION = 1
# The one task-name rule, shared by the store, the server and the OpenAPI document. Always matched in full
# (``is_task_name``): with ``re.match`` the ``$`` would also accept a trailing newline ("abc\n").
TASK_NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,63}$"
TASK_NAME_RULE = ("lower-case letters, digits, '.', '_', '-'; 1 to 64 characters; starting with a letter or digit; "
                  "names starting with '@' are reserved")
_TASK_NAME = re.compile(TASK_NAME_RE)

METHODS = ("jumplora", "lora")
REGULARIZERS = ("incremental", "ella")
REQUIRED_META = ("base_fingerprint", "method", "regularizer", "order")
STORE_FIELDS = ("format_version", "task", "layers", "tensors_sha256")  # set by put(), never by meta


def check_task_name(task: object) -> str:
    """Return `task` if it is a valid adapter name, else raise InvalidTaskName."""
    if is_task_name(task):
        return task
    if isinstance(task, str) and task.startswith("@"):
        raise InvalidTaskName(task, "names starting with '@' are reserved")
    raise InvalidTaskName(str(task), f"invalid task name ({TASK_NAME_RULE})")


def is_task_name(task: object) -> bool:
    """Whether `task` is a string that matches TASK_NAME_RE in full."""
    return isinstance(task, str) and _TASK_NAME.fullmatch(task) is not None


def _is_order(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_meta(meta: Mapping) -> None:
    """Raise ValueError naming the first meta key that is missing, invalid or not JSON."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    for key in REQUIRED_META:
        if key not in meta:
            raise ValueError(f"meta is missing required key {key!r}")
    for key, value in meta.items():
        if not isinstance(key, str) or key in STORE_FIELDS:
            raise ValueError(f"meta key {key!r} is not allowed (set by the store or not a string)")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta[{key!r}] is not JSON-serialisable: {e}") from None
    if not isinstance(meta["base_fingerprint"], str) or not meta["base_fingerprint"]:
        raise ValueError("meta['base_fingerprint'] must be a non-empty string")
    if meta["method"] not in METHODS:
        raise ValueError(f"meta['method'] must be one of {METHODS}, got {meta['method']!r}")
    if meta["regularizer"] not in REGULARIZERS:
        raise ValueError(f"meta['regularizer'] must be one of {REGULARIZERS}, got {meta['regularizer']!r}")
    if not _is_order(meta["order"]):
        raise ValueError(f"meta['order'] must be an int >= 0, got {meta['order']!r}")
    if not isinstance(meta.get("created_at", ""), str):
        raise ValueError("meta['created_at'] must be an ISO-8601 string")


def build_manifest(task: str, meta: Mapping, layers: dict, tensors_sha256: str) -> dict:
    """meta (checked, deep-copied as plain JSON) plus the fields the store owns."""
    check_meta(meta)
    manifest = json.loads(json.dumps(dict(meta), allow_nan=False))
    if "created_at" not in manifest:
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        manifest["created_at"] = now.replace("+00:00", "Z")
    manifest.update(format_version=FORMAT_VERSION, task=task, layers=layers, tensors_sha256=tensors_sha256)
    return manifest


def dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def parse_manifest(task: str, data: bytes) -> dict:
    """Parse manifest.json of the adapter stored as `task`; check the fields every reader relies on."""
    try:
        manifest = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CorruptAdapter(task, f"manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptAdapter(task, "manifest.json is not a JSON object")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise UnsupportedFormat(task, f"format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if manifest.get("task") != task:
        raise CorruptAdapter(task, f"manifest names task {manifest.get('task')!r}, not its folder's name")
    sha = manifest.get("tensors_sha256")
    checks = {
        "base_fingerprint": isinstance(manifest.get("base_fingerprint"), str),
        "order": _is_order(manifest.get("order")),
        "created_at": isinstance(manifest.get("created_at"), str),
        "layers": isinstance(manifest.get("layers"), dict) and bool(manifest["layers"]),
        "tensors_sha256": isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None,
    }
    for key, ok in checks.items():
        if not ok:
            raise CorruptAdapter(task, f"manifest field {key!r} is missing or invalid")
    return manifest
