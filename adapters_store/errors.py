"""Typed errors of the adapter store: each names the adapter and says why."""

from __future__ import annotations


class StoreError(Exception):
    """Base class. `task` is the adapter's name, `reason` a short explanation."""

    def __init__(self, task: str, reason: str) -> None:
        super().__init__(f"adapter {task!r}: {reason}")
        self.task = task
        self.reason = reason

    def __reduce__(self):  # keep the two-argument constructor picklable
        return (type(self), (self.task, self.reason))


class InvalidTaskName(StoreError):
    """The name does not match TASK_NAME_RE (names starting with '@' are reserved)."""


class AdapterNotFound(StoreError):
    """No adapter of that name is stored."""


class AdapterExists(StoreError):
    """An adapter of that name is already stored; stored adapters are immutable."""


class UnsupportedFormat(StoreError):
    """The manifest's format_version is missing or not one this code reads."""


class CorruptAdapter(StoreError):
    """Unreadable files, a checksum mismatch, or a manifest that contradicts its folder."""


class ForeignAdapter(StoreError):
    """The adapter was trained on another base model."""


class MalformedAdapter(StoreError):
    """Tensors that do not fit the manifest, the model, or each other."""


class StoreWriteError(StoreError):
    """Writing the adapter failed (disk full, read-only file system, ...); nothing was stored."""
