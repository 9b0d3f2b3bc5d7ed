"""The versioned model store: the one owner of its on-disk format.

Layout (the contract between `icaserve export`, which writes, and the service, which reads):

    <root>/<name>/<version>/manifest.json     what a server needs and a person wants to know
    <root>/<name>/<version>/model.ts          TorchScript (the service's format; explanations)
    <root>/<name>/<version>/model.onnx        ONNX (optional fast path for /predict)
    <root>/.staging/                          half-written versions; never listed

Versions are increasing integers and never overwritten. A version appears whole or not at all:
it is written in a staging folder and renamed into place (one atomic rename on one filesystem),
with the version number allocated under a file lock so concurrent exports cannot collide.
Names match a safe pattern and every path is checked to lie under the root. Readers get file
bytes only after their SHA-256 matches the manifest, from the same read that is then loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")  # \Z: "$" would admit a trailing "\n"
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
_STAGING = ".staging"


class StoreError(Exception):
    """Base of everything the store refuses; messages are safe to show to clients."""


class InvalidName(StoreError):
    pass


class ModelNotFound(StoreError):
    pass


class VersionNotFound(StoreError):
    pass


class ManifestError(StoreError):
    pass


class ChecksumMismatch(StoreError):
    pass


class FileEntry(BaseModel):
    path: str
    sha256: str
    bytes: int


class InputSpec(BaseModel):
    n_features: int = Field(ge=1)
    feature_names: list[str]
    class_names: list[str]
    min_length: int = Field(default=1, ge=1)
    max_length: int = Field(ge=1)
    train_length: int | None = None
    dtype: str = "float32"


class Normalization(BaseModel):
    """x_model = (x_raw - mean) / std, per feature; the service applies it."""

    mean: list[float]
    std: list[float]


KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")  # method and metric names in explanation_quality


class ExplanationQuality(BaseModel):
    """How well each saliency method's explanations find the evidence, measured at publish on
    samples with known ground truth (`icaserve evaluate`; training/evaluation.py defines the
    metrics): {method: {metric: value}} beside the model's accuracy on the same samples. A client
    picks the method that works for this model. A metric undefined on the samples is null."""

    model_config = ConfigDict(extra="allow")

    dataset: str = Field(min_length=1)
    n_samples: int = Field(ge=1)
    seed: int
    accuracy: float = Field(ge=0.0, le=1.0)
    methods: dict[str, dict[str, float | None]] = Field(min_length=1)

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
        for method, scores in methods.items():
            if not KEY_PATTERN.match(method):
                raise ValueError(f"method name {method!r} must match {KEY_PATTERN.pattern}")
            if not scores:
                raise ValueError(f"method {method!r} has no scores")
            for metric, value in scores.items():
                if not KEY_PATTERN.match(metric):
                    raise ValueError(f"metric name {metric!r} of {method} must match {KEY_PATTERN.pattern}")
                if value is not None and not math.isfinite(value):
                    raise ValueError(f"{method}.{metric} is {value}: scores are finite numbers or null")
        return methods


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    created_at: str
    description: str = ""
    architecture: dict[str, Any]
    input: InputSpec
    normalization: Normalization
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry]
    versions: dict[str, str] = Field(default_factory=dict)
    explanation_quality: ExplanationQuality | None = None  # optional: older manifests lack it


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidName(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: int | str) -> int:
    """A version as given by a user: a positive integer (or its decimal string)."""
    if isinstance(version, bool):
        raise VersionNotFound(f"invalid version {version!r}")
    if isinstance(version, str):
        # isascii: str.isdigit() also admits '²' (int() refuses it) and other scripts' digits
        if not (version.isascii() and version.isdigit()) or len(version) > 9:
            raise VersionNotFound(f"invalid version {version!r}: versions are positive integers or 'latest'")
        version = int(version)
    if not isinstance(version, int) or version < 1:
        raise VersionNotFound(f"invalid version {version!r}: versions are positive integers or 'latest'")
    return version


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Staging:
    """A version being written: put files in `dir`, fill `manifest` (without files/version)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.manifest: dict[str, Any] = {}
        self.version: int | None = None  # set once published


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    # -- reading ---------------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        path = (self.root / check_name(name)).resolve()
        if path.parent != self.root:  # belt and braces: the pattern already forbids separators
            raise InvalidName(f"invalid model name {name!r}")
        return path

    def models(self) -> list[str]:
        """Names of models with at least one published version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if NAME_PATTERN.match(p.name) and p.is_dir() and self.versions(p.name)
        )

    def versions(self, name: str) -> list[int]:
        d = self._model_dir(name)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir()
                      if p.name.isascii() and p.name.isdigit() and (p / MANIFEST).is_file())

    def resolve(self, name: str, version: int | str | None = "latest") -> int:
        """The concrete version meant by `version` ('latest', None, an int or a digit string)."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        if version is None or version == "latest":
            return versions[-1]
        v = check_version(version)
        if v not in versions:
            raise VersionNotFound(f"model {name!r} has no version {v} (versions: {versions})")
        return v

    def version_dir(self, name: str, version: int | str | None = "latest") -> Path:
        return self._model_dir(name) / str(self.resolve(name, version))

    def manifest(self, name: str, version: int | str | None = "latest") -> Manifest:
        """The manifest of a version, which must name the folder it lies in: a version folder
        copied under another number (`cp -r 1 2`) would otherwise load as the version its
        manifest names, and a server would see a "new" version on every poll."""
        path = self.version_dir(name, version) / MANIFEST
        try:
            manifest = Manifest.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError) as exc:
            raise ManifestError(f"manifest of {name} v{path.parent.name} is unreadable or invalid: {exc}") from None
        if manifest.name != name or str(manifest.version) != path.parent.name:
            raise ManifestError(
                f"manifest of {name} v{path.parent.name} says {manifest.name} v{manifest.version}: it does not "
                f"match its folder (a copied version?); publish with `icaserve export`")
        return manifest

    def signature(self, name: str, version: int | str) -> tuple:
        """What the files of a version folder look like now (name, size, mtime, ctime, inode of
        each entry): a few stat calls, no reads. A refused version is retried once this changes,
        e.g. when a file that was still being written is complete."""
        vdir = self.version_dir(name, version)
        out = []
        for entry in sorted(os.scandir(vdir), key=lambda e: e.name):
            try:
                st = entry.stat()
            except OSError:  # vanished between listing and stat
                continue
            out.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return tuple(out)

    def read_file(self, name: str, version: int | str | None, key: str) -> tuple[Manifest, bytes]:
        """The bytes of one model file, after checking size and SHA-256 against the manifest."""
        manifest = self.manifest(name, version)
        entry = manifest.files.get(key)
        if entry is None:
            raise ManifestError(f"{name} v{manifest.version} has no {key} file")
        vdir = self._model_dir(name) / str(manifest.version)
        path = (vdir / entry.path).resolve()
        if path.parent != vdir.resolve():
            raise ManifestError(f"{name} v{manifest.version}: file path {entry.path!r} leaves the version folder")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ChecksumMismatch(f"{name} v{manifest.version}: cannot read {entry.path}: {exc.strerror}") from None
        if len(data) != entry.bytes or sha256_bytes(data) != entry.sha256:
            raise ChecksumMismatch(
                f"{name} v{manifest.version}: {entry.path} does not match its manifest checksum "
                f"({len(data)} bytes, expected {entry.bytes})"
            )
        return manifest, data

    def verify(self, name: str, version: int | str | None = "latest") -> Manifest:
        """Check every file of a version; raises ChecksumMismatch on the first bad one."""
        manifest = self.manifest(name, version)
        for key in manifest.files:
            self.read_file(name, manifest.version, key)
        return manifest

    # -- writing ---------------------------------------------------------------------------
    def republish(self, name: str, version: int | str | None, changes: dict[str, Any]) -> int:
        """A new version of `name` holding the same (checksum-verified) files as `version` and its
        manifest with `changes` applied, e.g. an `explanation_quality` measured later: versions are
        never rewritten. The manifest records `derived_from` (the source version)."""
        source = self.manifest(name, version)
        reserved = {"schema_version", "name", "version", "created_at", "files"} & set(changes)
        if reserved:
            raise ManifestError(f"republish cannot change {sorted(reserved)}")
        with self.stage(name) as stage:
            for key in source.files:
                _, data = self.read_file(name, source.version, key)
                (stage.dir / FILE_NAMES.get(key, source.files[key].path)).write_bytes(data)
            record = source.model_dump()
            for key in ("schema_version", "name", "version", "created_at", "files"):
                record.pop(key, None)
            stage.manifest = {**record, **changes, "derived_from": {"version": source.version}}
        assert stage.version is not None
        return stage.version

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Staging]:
        """Write a new version; it is published when the block exits cleanly, else discarded."""
        model_dir = self._model_dir(name)
        staging_root = self.root / _STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Staging(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root)))
        try:
            yield staging
            self._publish(name, model_dir, staging)
        finally:
            shutil.rmtree(staging.dir, ignore_errors=True)

    def _publish(self, name: str, model_dir: Path, staging: Staging) -> None:
        files = {}
        for key, filename in FILE_NAMES.items():
            path = staging.dir / filename
            if path.exists():
                data = path.read_bytes()
                files[key] = {"path": filename, "sha256": sha256_bytes(data), "bytes": len(data)}
        if "torchscript" not in files:
            raise ManifestError("a version needs at least its TorchScript file")
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            version = max(self.versions(name), default=0) + 1
            # Leftover folders without a manifest (a crash mid-way elsewhere) never get reused.
            while (model_dir / str(version)).exists():
                version += 1
            record = {
                **staging.manifest,
                "schema_version": SCHEMA_VERSION,
                "name": name,
                "version": version,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": files,
            }
            try:  # refuse to publish what readers would refuse, as a StoreError like every refusal
                manifest = Manifest.model_validate(record)
            except ValidationError as exc:
                raise ManifestError(f"refusing to publish {name}: invalid manifest: {exc}") from None
            (staging.dir / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
            for p in [staging.dir / MANIFEST, *(staging.dir / f["path"] for f in files.values())]:
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            staging.dir.chmod(0o755)  # mkdtemp makes it private; readers may run as another user
            os.rename(staging.dir, model_dir / str(version))
            dir_fd = os.open(model_dir, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            staging.version = version
