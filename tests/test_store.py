"""The model store: versions, atomic publishing, concurrency, names, paths, checksums, manifests.

These tests need no torch: a "model" here is any bytes written as model.ts.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from model_store import (
    ChecksumMismatch,
    InvalidName,
    ManifestError,
    ModelNotFound,
    ModelStore,
    StoreError,
    VersionNotFound,
    check_name,
    check_version,
)
from model_store.store import MANIFEST, sha256_bytes


def _manifest_fields(tag: str = "") -> dict:
    """What a writer fills in (everything except version, name, files, created_at)."""
    return {
        "description": tag,
        "architecture": {"cell": "lstm", "label": "LSTM"},
        "input": {
            "n_features": 2,
            "feature_names": ["a", "b"],
            "class_names": ["neg", "pos"],
            "max_length": 50,
        },
        "normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
    }


def publish(store: ModelStore, name: str, payload: bytes = b"ts", onnx: bytes | None = None, tag: str = "") -> int:
    with store.stage(name) as stage:
        (stage.dir / "model.ts").write_bytes(payload)
        if onnx is not None:
            (stage.dir / "model.onnx").write_bytes(onnx)
        stage.manifest = _manifest_fields(tag)
    assert stage.version is not None
    return stage.version


def staging_entries(store: ModelStore) -> list[str]:
    d = store.root / ".staging"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


# -- versions -------------------------------------------------------------------------------


def test_versions_start_at_one_and_increase(store: ModelStore) -> None:
    assert store.models() == []
    assert store.versions("m") == []
    got = [publish(store, "m", f"payload {i}".encode(), tag=str(i)) for i in range(3)]
    assert got == [1, 2, 3]
    assert store.versions("m") == [1, 2, 3]
    assert store.models() == ["m"]
    # Another model has its own numbering.
    assert publish(store, "other") == 1
    assert store.models() == ["m", "other"]
    # Nothing was overwritten: each version still holds what was published as it.
    for i, v in enumerate(got):
        manifest, data = store.read_file("m", v, "torchscript")
        assert data == f"payload {i}".encode()
        assert manifest.version == v and manifest.name == "m" and manifest.description == str(i)
    assert staging_entries(store) == []


def test_published_version_is_whole_and_readable(store: ModelStore) -> None:
    v = publish(store, "m", b"torchscript bytes", onnx=b"onnx bytes")
    vdir = store.version_dir("m", v)
    assert sorted(p.name for p in vdir.iterdir()) == ["manifest.json", "model.onnx", "model.ts"]
    m = store.verify("m", v)
    assert m.files["torchscript"].sha256 == sha256_bytes(b"torchscript bytes")
    assert m.files["onnx"].bytes == len(b"onnx bytes")
    assert store.read_file("m", "latest", "onnx")[1] == b"onnx bytes"
    assert m.created_at  # stamped by the store


def test_version_numbers_never_reused_after_leftover_folder(store: ModelStore) -> None:
    publish(store, "m")
    # A folder without a manifest (e.g. a crash elsewhere) is not a version and is never reused.
    (store.root / "m" / "2").mkdir()
    assert store.versions("m") == [1]
    assert publish(store, "m") == 3
    assert store.versions("m") == [1, 3]


def test_failed_block_publishes_nothing(store: ModelStore) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with store.stage("m") as stage:
            (stage.dir / "model.ts").write_bytes(b"half written")
            stage.manifest = _manifest_fields()
            raise RuntimeError("boom")
    assert stage.version is None
    assert store.models() == []
    assert store.versions("m") == []
    assert staging_entries(store) == []
    with pytest.raises(ModelNotFound):
        store.resolve("m")
    # The store keeps working afterwards, and numbering starts at 1.
    assert publish(store, "m") == 1


def test_failed_block_after_earlier_versions_leaves_them_alone(store: ModelStore) -> None:
    publish(store, "m", b"v1")
    with pytest.raises(KeyError):
        with store.stage("m") as stage:
            (stage.dir / "model.ts").write_bytes(b"never")
            raise KeyError("x")
    assert store.versions("m") == [1]
    assert store.read_file("m", "latest", "torchscript")[1] == b"v1"
    assert staging_entries(store) == []


def test_publish_without_torchscript_is_refused(store: ModelStore) -> None:
    with pytest.raises(ManifestError, match="TorchScript"):
        with store.stage("m") as stage:
            (stage.dir / "model.onnx").write_bytes(b"onnx only")
            stage.manifest = _manifest_fields()
    assert store.versions("m") == [] and store.models() == []
    assert staging_entries(store) == []


def test_publish_with_invalid_manifest_is_refused(store: ModelStore) -> None:
    bad = _manifest_fields()
    del bad["architecture"]
    bad["input"]["n_features"] = 0
    with pytest.raises(ManifestError):
        with store.stage("m") as stage:
            (stage.dir / "model.ts").write_bytes(b"ts")
            stage.manifest = bad
    assert store.versions("m") == [] and store.models() == []
    assert staging_entries(store) == []


# -- concurrency ----------------------------------------------------------------------------


def _concurrent_writer(root: str, worker: int, count: int, start, results) -> None:
    store = ModelStore(root)
    start.wait(timeout=60)
    for i in range(count):
        payload = f"worker {worker} publish {i}".encode() * 50
        v = publish(store, "shared", payload, onnx=payload[::-1], tag=f"{worker}:{i}")
        results.put((worker, i, v))


def test_concurrent_publishes_from_processes_get_distinct_whole_versions(tmp_path: Path) -> None:
    workers, each = 4, 3
    root = tmp_path / "store"
    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch's threads
    start = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(root), w, each, start, results)) for w in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=120) for _ in range(workers * each)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    versions = sorted(v for _, _, v in got)
    assert versions == list(range(1, workers * each + 1))
    store = ModelStore(root)
    assert store.versions("shared") == versions
    for worker, i, v in got:
        manifest = store.verify("shared", v)  # every file present and matching its checksum
        assert manifest.version == v
        assert manifest.description == f"{worker}:{i}"
        payload = f"worker {worker} publish {i}".encode() * 50
        assert store.read_file("shared", v, "torchscript")[1] == payload
        assert store.read_file("shared", v, "onnx")[1] == payload[::-1]
    assert staging_entries(store) == []


# -- resolving ------------------------------------------------------------------------------


def test_resolve(store: ModelStore) -> None:
    for _ in range(3):
        publish(store, "m")
    assert store.resolve("m") == 3
    assert store.resolve("m", "latest") == 3
    assert store.resolve("m", None) == 3
    assert store.resolve("m", 2) == 2
    assert store.resolve("m", "2") == 2
    assert store.resolve("m", "002") == 2
    assert store.manifest("m", "1").version == 1
    with pytest.raises(VersionNotFound, match="no version 4"):
        store.resolve("m", 4)
    for bad in ("0", 0, -1, "-1", "1.0", "abc", "", " 1", "latest2", True, 1.0, "9" * 20):
        with pytest.raises(VersionNotFound):
            store.resolve("m", bad)
    with pytest.raises(ModelNotFound, match="not found"):
        store.resolve("nope")
    with pytest.raises(ModelNotFound):
        store.manifest("nope", 1)
    with pytest.raises(ModelNotFound):
        store.read_file("nope", "latest", "torchscript")
    assert issubclass(ModelNotFound, StoreError) and issubclass(VersionNotFound, StoreError)


def test_check_version() -> None:
    assert check_version(7) == 7
    assert check_version("7") == 7
    for bad in (0, -3, "x", False, "1e3", None):
        with pytest.raises(VersionNotFound):
            check_version(bad)


# -- names and paths ------------------------------------------------------------------------

BAD_NAMES = [
    "../x",
    "..",
    ".",
    "a/b",
    "a\\b",
    "/etc",
    "",
    ".hidden",
    "UPPER",
    "Mixed",
    "a" * 65,
    "a\x00b",
    "\x00",
    "abc\n",
    "has space",
    "-leading-dash",
    "_leading",
    "caf\u00e9",
    ".staging",
    None,
    3,
]
GOOD_NAMES = ["a", "0", "model-1_x", "a" * 64, "ica-lstm"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_check_name_refuses(name) -> None:
    with pytest.raises(InvalidName):
        check_name(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_no_store_operation_accepts_a_bad_name(tmp_path: Path, name) -> None:
    root = tmp_path / "deep" / "store"
    store = ModelStore(root)
    publish(store, "ok")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for op in (
        lambda: store.versions(name),
        lambda: store.resolve(name),
        lambda: store.manifest(name),
        lambda: store.read_file(name, "latest", "torchscript"),
        lambda: store.verify(name),
    ):
        with pytest.raises(InvalidName):
            op()
    with pytest.raises(InvalidName):
        with store.stage(name) as stage:
            (stage.dir / "model.ts").write_bytes(b"escape")
            stage.manifest = _manifest_fields()
    # Nothing was created anywhere, inside the root or outside it.
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert store.models() == ["ok"]


def test_models_ignores_foreign_entries(store: ModelStore) -> None:
    publish(store, "m")
    (store.root / "UPPER").mkdir()
    (store.root / "UPPER" / "1").mkdir()
    (store.root / "UPPER" / "1" / MANIFEST).write_text("{}")
    (store.root / "empty").mkdir()  # no versions
    (store.root / "afile").write_text("x")
    (store.root / "m" / "notes").mkdir()  # not a version number
    (store.root / "m" / "5").mkdir()  # no manifest: not a version
    assert store.models() == ["m"]
    assert store.versions("m") == [1]


def _rewrite_manifest(store: ModelStore, name: str, version: int, edit) -> None:
    path = store.root / name / str(version) / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "bad_path", ["../../etc/passwd", "../1/model.ts", "/etc/passwd", "sub/model.ts", "..", "."]
)
def test_read_file_refuses_manifest_paths_leaving_the_version(store: ModelStore, bad_path: str) -> None:
    publish(store, "m", b"v1")
    publish(store, "m", b"v2")

    def edit(d: dict) -> None:
        d["files"]["torchscript"]["path"] = bad_path

    _rewrite_manifest(store, "m", 2, edit)
    with pytest.raises(ManifestError, match="leaves the version folder"):
        store.read_file("m", 2, "torchscript")
    with pytest.raises(ManifestError):
        store.verify("m", 2)


def test_read_file_refuses_symlink_out_of_the_version(store: ModelStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"ts")  # same bytes as published, so only the path check can refuse it
    publish(store, "m", b"ts")
    target = store.root / "m" / "1" / "model.ts"
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(ManifestError, match="leaves the version folder"):
        store.read_file("m", 1, "torchscript")


# -- checksums ------------------------------------------------------------------------------


def test_truncated_file_is_detected(store: ModelStore) -> None:
    publish(store, "m", b"0123456789" * 10, onnx=b"onnx")
    path = store.version_dir("m", 1) / "model.ts"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ChecksumMismatch, match="checksum"):
        store.read_file("m", 1, "torchscript")
    with pytest.raises(ChecksumMismatch):
        store.verify("m", 1)
    # The other file is still fine.
    assert store.read_file("m", 1, "onnx")[1] == b"onnx"


def test_corrupted_file_of_same_size_is_detected(store: ModelStore) -> None:
    publish(store, "m", b"0123456789" * 10)
    path = store.version_dir("m", 1) / "model.ts"
    data = bytearray(path.read_bytes())
    data[42] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        store.read_file("m", 1, "torchscript")


def test_missing_or_unreadable_file_is_detected(store: ModelStore) -> None:
    publish(store, "m", b"ts", onnx=b"onnx")
    (store.version_dir("m", 1) / "model.onnx").unlink()
    with pytest.raises(ChecksumMismatch, match="cannot read"):
        store.read_file("m", 1, "onnx")
    (store.version_dir("m", 1) / "model.ts").unlink()
    (store.version_dir("m", 1) / "model.ts").mkdir()  # a folder where the file should be
    with pytest.raises(ChecksumMismatch):
        store.read_file("m", 1, "torchscript")


def test_unknown_file_key(store: ModelStore) -> None:
    publish(store, "m")  # no onnx
    with pytest.raises(ManifestError, match="no onnx file"):
        store.read_file("m", 1, "onnx")


# -- manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "breakage",
    [
        "not json",
        "empty object",
        "missing architecture",
        "version zero",
        "files wrong type",
        "bad input spec",
        "truncated",
    ],
)
def test_invalid_manifest_gives_manifest_error(store: ModelStore, breakage: str) -> None:
    publish(store, "m")
    path = store.version_dir("m", 1) / MANIFEST
    data = json.loads(path.read_text())
    if breakage == "not json":
        path.write_text("this is { not json")
    elif breakage == "empty object":
        path.write_text("{}")
    elif breakage == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    else:
        if breakage == "missing architecture":
            del data["architecture"]
        elif breakage == "version zero":
            data["version"] = 0
        elif breakage == "files wrong type":
            data["files"] = ["model.ts"]
        elif breakage == "bad input spec":
            data["input"]["n_features"] = "many"
        path.write_text(json.dumps(data))
    assert store.versions("m") == [1]  # still listed (it has a manifest) ...
    with pytest.raises(ManifestError, match="invalid"):  # ... but refused when read
        store.manifest("m", 1)
    with pytest.raises(ManifestError):
        store.read_file("m", 1, "torchscript")
    assert issubclass(ManifestError, StoreError) and issubclass(ChecksumMismatch, StoreError)


def test_manifest_round_trip(store: ModelStore) -> None:
    publish(store, "m", b"abc", tag="hello")
    m = store.manifest("m")
    assert m.name == "m" and m.version == 1 and m.schema_version == 1
    assert m.input.feature_names == ["a", "b"] and m.input.class_names == ["neg", "pos"]
    assert m.input.min_length == 1 and m.input.max_length == 50
    assert m.normalization.std == [1.0, 1.0]
    on_disk = json.loads((store.version_dir("m") / MANIFEST).read_text())
    assert on_disk["files"]["torchscript"] == {"path": "model.ts", "sha256": sha256_bytes(b"abc"), "bytes": 3}


def test_version_folders_are_readable_by_others(store: ModelStore) -> None:
    publish(store, "m")
    mode = os.stat(store.version_dir("m", 1)).st_mode
    assert mode & 0o055 == 0o055  # group/other can read and enter (mkdtemp's 0700 was widened)


# -- explanation_quality (issue 11) -----------------------------------------------------------
def _quality(**changes) -> dict:
    q = {"dataset": "earlier_box", "n_samples": 300, "seed": 0, "accuracy": 1.0,
         "methods": {"gradient": {"auc": 0.94, "topk_jaccard": 0.61, "box_time_mass": 0.48, "euclidean": None,
                                  "n": 300},
                     "tsr": {"auc": 0.95, "n": 20}},
         "chance": {"auc": 0.5, "box_time_mass": 0.3}}
    q.update(changes)
    return q


def test_explanation_quality_round_trips(store: ModelStore) -> None:
    with store.stage("m") as stage:
        (stage.dir / "model.ts").write_bytes(b"ts")
        stage.manifest = {**_manifest_fields(), "explanation_quality": _quality()}
    m = store.manifest("m")
    q = m.explanation_quality
    assert q is not None and q.dataset == "earlier_box" and q.n_samples == 300 and q.accuracy == 1.0
    assert q.methods["gradient"]["auc"] == pytest.approx(0.94) and q.methods["gradient"]["euclidean"] is None
    assert q.methods["tsr"]["n"] == 20
    on_disk = json.loads((store.version_dir("m") / MANIFEST).read_text())
    assert on_disk["explanation_quality"]["methods"] == _quality()["methods"]
    assert on_disk["explanation_quality"]["chance"] == {"auc": 0.5, "box_time_mass": 0.3}  # extra keys kept


def test_manifest_without_explanation_quality_stays_valid(store: ModelStore) -> None:
    publish(store, "m")
    path = store.version_dir("m", 1) / MANIFEST
    data = json.loads(path.read_text())
    data.pop("explanation_quality", None)  # a manifest written before the field existed
    path.write_text(json.dumps(data))
    assert store.manifest("m", 1).explanation_quality is None


@pytest.mark.parametrize(
    "bad",
    [
        {"accuracy": 1.5},
        {"n_samples": 0},
        {"methods": {}},
        {"methods": {"gradient": {}}},
        {"methods": {"Gradient!": {"auc": 0.5}}},
        {"methods": {"gradient": {"auc": float("nan")}}},
        {"methods": {"gradient": {"auc": float("inf")}}},
        {"methods": {"gradient": {"auc": "high"}}},
        {"dataset": ""},
    ],
    ids=["accuracy>1", "no samples", "no methods", "empty method", "bad name", "nan", "inf", "text", "no dataset"],
)
def test_invalid_explanation_quality_is_refused(store: ModelStore, bad: dict) -> None:
    with pytest.raises(ManifestError, match="explanation_quality"):
        with store.stage("m") as stage:
            (stage.dir / "model.ts").write_bytes(b"ts")
            stage.manifest = {**_manifest_fields(), "explanation_quality": _quality(**bad)}
    assert store.versions("m") == []
    # ... and a reader refuses it written by hand too
    publish(store, "m")
    path = store.version_dir("m", 1) / MANIFEST
    data = json.loads(path.read_text())
    data["explanation_quality"] = _quality(**bad)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="invalid"):
        store.manifest("m", 1)


def test_missing_required_quality_field_is_refused(store: ModelStore) -> None:
    q = _quality()
    del q["seed"]
    with pytest.raises(ManifestError, match="seed"):
        with store.stage("m") as stage:
            (stage.dir / "model.ts").write_bytes(b"ts")
            stage.manifest = {**_manifest_fields(), "explanation_quality": q}


def test_republish_makes_a_new_version_with_the_same_files(store: ModelStore) -> None:
    publish(store, "m", b"weights", onnx=b"graph", tag="first")
    v = store.republish("m", 1, {"explanation_quality": _quality()})
    assert v == 2 and store.versions("m") == [1, 2]
    old, new = store.verify("m", 1), store.verify("m", 2)
    assert old.explanation_quality is None  # version 1 is never rewritten
    assert new.explanation_quality is not None and new.explanation_quality.methods["gradient"]["auc"] == 0.94
    assert {k: f.sha256 for k, f in new.files.items()} == {k: f.sha256 for k, f in old.files.items()}
    assert new.description == "first" and new.normalization == old.normalization
    assert new.model_dump()["derived_from"] == {"version": 1}
    with pytest.raises(ManifestError, match="cannot change"):
        store.republish("m", 1, {"version": 7})
    with pytest.raises(ManifestError, match="explanation_quality"):
        store.republish("m", 1, {"explanation_quality": _quality(accuracy=2.0)})
    assert store.versions("m") == [1, 2]


def test_republish_refuses_a_damaged_source(store: ModelStore) -> None:
    publish(store, "m", b"weights")
    (store.version_dir("m", 1) / "model.ts").write_bytes(b"weightz")
    with pytest.raises(ChecksumMismatch):
        store.republish("m", 1, {"explanation_quality": _quality()})
    assert store.versions("m") == [1]
