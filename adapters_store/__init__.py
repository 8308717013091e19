"""On-disk store of per-task adapters: format, atomic writes, manifests, checksums.

Imports nothing from the server or client packages.
"""

from .deltas import Delta, LowRankDelta, SparseDelta
from .errors import (
    AdapterExists,
    AdapterNotFound,
    CorruptAdapter,
    ForeignAdapter,
    InvalidTaskName,
    MalformedAdapter,
    StoreError,
    StoreWriteError,
    UnsupportedFormat,
)
from .manifest import FORMAT_VERSION, TASK_NAME_RE, TASK_NAME_RULE, is_task_name
from .store import AdapterStore, StoredAdapter

__all__ = [
    "FORMAT_VERSION",
    "TASK_NAME_RE",
    "TASK_NAME_RULE",
    "AdapterExists",
    "AdapterNotFound",
    "AdapterStore",
    "CorruptAdapter",
    "Delta",
    "ForeignAdapter",
    "InvalidTaskName",
    "LowRankDelta",
    "MalformedAdapter",
    "SparseDelta",
    "StoreError",
    "StoreWriteError",
    "StoredAdapter",
    "UnsupportedFormat",
    "is_task_name",
]
