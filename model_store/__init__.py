"""The versioned model repository: export writes it, the service reads it (see store.py)."""

from model_store.store import (
    FILE_NAMES,
    ChecksumMismatch,
    InvalidName,
    Manifest,
    ManifestError,
    ModelNotFound,
    ModelStore,
    StoreError,
    VersionNotFound,
    check_name,
    check_version,
)

__all__ = [
    "FILE_NAMES",
    "ChecksumMismatch",
    "InvalidName",
    "Manifest",
    "ManifestError",
    "ModelNotFound",
    "ModelStore",
    "StoreError",
    "VersionNotFound",
    "check_name",
    "check_version",
]
