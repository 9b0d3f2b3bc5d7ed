"""The `icaserve` command line: train -> export -> models, and clean errors for bad input.

Most calls run in-process through typer's CliRunner; one runs the real `python -m icaserve.cli`
to see what a user's terminal gets on an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icaserve.cli import app
from model_store import ModelStore

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = [
    "--dataset", "earlier_box", "--length", "12", "--features", "5", "--n-train", "80", "--n-test", "20",
    "--epochs", "3", "--batch-size", "20", "--lr", "0.01", "--hops", "3", "--d-a", "6", "--hidden", "4",
    "--device", "cpu",
]  # fmt: skip


runner = CliRunner()


def invoke(*args: str, **kw):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"}, **kw)


def flat(text: str) -> str:
    """Rich wraps long lines; compare with whitespace collapsed."""
    return " ".join(text.split())


def assert_clean_failure(result, *needles: str) -> None:
    text = flat(result.output)
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no uncaught exception
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`icaserve train ... --export cli-model --store <tmp>`, run once for the module."""
    tmp = tmp_path_factory.mktemp("cli")
    ckpt, store = tmp / "ckpt" / "model.pt", tmp / "store"
    result = invoke("train", *TINY_TRAIN, "--out", ckpt, "--export", "cli-model", "--store", store)
    return result, ckpt, store


def test_train_with_export(trained) -> None:
    result, ckpt, store = trained
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "checkpoint:" in text and ckpt.name in text
    assert "published cli-model v1" in text
    assert "validation" in text and "test" in text  # the metrics table
    assert ckpt.is_file()
    st = ModelStore(store)
    assert st.models() == ["cli-model"] and st.versions("cli-model") == [1]
    m = st.verify("cli-model", 1)
    assert m.input.n_features == 5 and m.input.train_length == 12
    assert m.input.class_names == ["negative", "positive"]
    assert m.architecture["attention"] == "ica" and m.architecture["r"] == 3
    assert set(m.metrics) == {"train", "validation", "test"}
    assert m.training["dataset"] == "earlier_box" and m.training["epochs"] == 3
    assert m.training["n_train"] + m.training["n_val"] == 80


def test_models_table_and_json(trained) -> None:
    _, _, store = trained
    result = invoke("models", "--store", store)
    assert result.exit_code == 0, result.output
    assert "cli-model" in result.stdout
    assert "ICA-LSTM (matrix)" in flat(result.stdout)

    result = invoke("models", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [m["name"] for m in listing] == ["cli-model"]
    assert listing[0]["version"] == 1
    assert listing[0]["input"]["feature_names"] == [f"f{i}" for i in range(5)]
    assert set(listing[0]["files"]) == {"torchscript", "onnx"}


def test_export_command_publishes_next_version(trained) -> None:
    _, ckpt, store = trained
    result = invoke("export", ckpt, "--name", "cli-model", "--store", store)
    assert result.exit_code == 0, result.output
    assert "published cli-model v2" in flat(result.output)
    result = invoke("export", ckpt, "--name", "cli-model", "--store", store, "--no-onnx", "--max-length", "64")
    assert result.exit_code == 0, result.output
    assert "published cli-model v3" in flat(result.output)

    result = invoke("models", "cli-model", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    (latest,) = json.loads(result.stdout)
    assert latest["version"] == 3
    assert set(latest["files"]) == {"torchscript"}
    assert latest["input"]["max_length"] == 64
    st = ModelStore(store)
    assert st.versions("cli-model") == [1, 2, 3]
    assert st.manifest("cli-model", 2).architecture == st.manifest("cli-model", 1).architecture
    assert st.manifest("cli-model", 2).normalization == st.manifest("cli-model", 1).normalization
    table = invoke("models", "--store", store)
    assert table.exit_code == 0 and "1,2,3" in table.stdout  # the versions column


def test_models_on_empty_store(tmp_path: Path) -> None:
    result = invoke("models", "--store", tmp_path / "nothing-here", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert invoke("models", "--store", tmp_path).exit_code == 0


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--dataset", "nope"], ["error:", "unknown dataset 'nope'"]),
        (["--dataset", "/nonexistent/data.npz"], ["error:", "no such file"]),
        (["--cell", "transformer"], ["error:", "cell must be one of"]),
        (["--attention", "global"], ["error:", "attention must be one of"]),
        (["--variant", "sum"], ["error:", "ica_variant must be one of"]),
        (["--epochs", "0"], ["Invalid value"]),
        (["--val-fraction", "1.5"], ["Invalid value"]),
    ],
)
def test_train_bad_inputs(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    base = ["--n-train", "20", "--n-test", "10", "--length", "4", "--features", "3", "--epochs", "1"]
    result = invoke("train", *base, *args, "--out", tmp_path / "x.pt", "--store", tmp_path / "store")
    assert_clean_failure(result, *needles)
    assert not (tmp_path / "x.pt").exists()
    assert not (tmp_path / "store").exists()


def test_train_bad_npz_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    result = invoke("train", "--dataset", bad, "--epochs", "1", "--out", tmp_path / "x.pt")
    assert_clean_failure(result, "error:", "not a readable .npz")


def test_export_bad_inputs(trained, tmp_path: Path) -> None:
    _, ckpt, _ = trained
    store = tmp_path / "store"
    result = invoke("export", tmp_path / "missing.pt", "--name", "m", "--store", store)
    assert_clean_failure(result, "error:", "no such checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    result = invoke("export", garbage, "--name", "m", "--store", store)
    assert_clean_failure(result, "error:", "not a readable checkpoint")
    for name in ("../escape", "UPPER"):  # test_store.py covers names in depth; each try costs an export's checks
        result = invoke("export", ckpt, "--name", name, "--store", store)
        assert_clean_failure(result, "error:", "invalid model name")
    assert ModelStore(store).models() == []
    assert not (tmp_path / "escape").exists()
    result = invoke("export", ckpt, "--store", store)  # --name is required
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_models_bad_inputs(trained) -> None:
    _, _, store = trained
    assert_clean_failure(invoke("models", "../x", "--store", store), "error:", "invalid model name")
    assert_clean_failure(invoke("models", "unknown-model", "--store", store), "error:", "not found")


def test_train_with_invalid_export_name_fails_before_training(tmp_path: Path) -> None:
    args = [a if a != "3" else "1" for a in TINY_TRAIN]  # one epoch
    result = invoke("train", *args, "--out", tmp_path / "m.pt", "--export", "Bad Name", "--store", tmp_path / "s")
    assert_clean_failure(result, "error:", "invalid model name")
    assert not (tmp_path / "m.pt").exists()  # refused up front: no training time spent
    assert ModelStore(tmp_path / "s").models() == []


def test_real_entry_point_reports_errors_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "icaserve.cli", "train", "--dataset", "nope", "--out", str(tmp_path / "x.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "unknown dataset 'nope'" in flat(proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "icaserve.cli", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0
    for command in ("train", "export", "models", "serve"):
        assert command in proc.stdout
