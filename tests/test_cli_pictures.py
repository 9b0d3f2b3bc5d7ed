"""`icaserve predict FILE` and `icaserve explain FILE --png`: on the shipped model, against the
local store (served in-process) and against a running server (conftest's `server_factory`); both
must give the same numbers, and a bad file or a refused input ends with the service's message
and exit status 2, never a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO
from icaserve.cli import app
from training.datasets import make_box_dataset

SHIPPED = "middle-box-ica-lstm"
STORE = REPO / "model_store"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A middle_box sample of each class as .npz (with its true box), the first also as .csv and .json."""
    tmp = tmp_path_factory.mktemp("pictures")
    ds = make_box_dataset("middle_box", 2, 100, 100, seed=3)
    np.savez(tmp / "two.npz", X=ds.X, y=ds.y, masks=ds.masks)
    header = ",".join(ds.feature_names)
    np.savetxt(tmp / "one.csv", ds.X[0], delimiter=",", fmt="%.6f", header=header, comments="")
    (tmp / "one.json").write_text(json.dumps({"inputs": [np.round(ds.X[0].astype(float), 6).tolist()]}))
    (tmp / "narrow.csv").write_text("\n".join(",".join(f"{v:.3f}" for v in row[:7]) for row in ds.X[0]))
    (tmp / "words.csv").write_text("1,2\n3,four\n")
    return tmp, ds


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    store = tmp_path_factory.mktemp("shipped_only") / "store"
    shutil.copytree(STORE / SHIPPED, store / SHIPPED)
    srv = server_factory(store)
    yield srv
    srv.stop()


def test_predict_local_store(files) -> None:
    tmp, ds = files
    result = invoke("predict", tmp / "two.npz", "--store", STORE, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    labels = [p["label"] for p in answer["predictions"]]
    assert labels == [ds.class_names[y] for y in ds.y]  # the shipped model gets middle_box right
    table = invoke("predict", tmp / "one.csv", "--store", STORE)
    assert table.exit_code == 0 and ds.class_names[ds.y[0]] in table.stdout


def test_explain_local_and_remote_agree(files, server, tmp_path) -> None:
    tmp, ds = files
    local_png, local_npz = tmp_path / "local.png", tmp_path / "local.npz"
    result = invoke("explain", tmp / "two.npz", "--sequence", "1", "--method", "integrated_gradients",
                    "--param", "steps=8", "--target", "all", "--attention", "--png", local_png, "--npz", local_npz,
                    "--store", STORE)
    assert result.exit_code == 0, result.output
    assert local_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local_png.stat().st_size > 20_000
    remote_png, remote_npz = tmp_path / "remote.png", tmp_path / "remote.npz"
    result = invoke("explain", tmp / "two.npz", "--sequence", "1", "--method", "integrated_gradients",
                    "--param", "steps=8", "--target", "all", "--attention", "--png", remote_png, "--npz", remote_npz,
                    "--url", server.url, "--model", SHIPPED)
    assert result.exit_code == 0, result.output
    with np.load(local_npz) as a, np.load(remote_npz) as b:
        assert a["saliency"].shape == (2, 100, 100) and a["attention"].shape == (100, 100)
        np.testing.assert_array_equal(a["inputs"], ds.X[1])
        np.testing.assert_array_equal(a["mask"].astype(bool), ds.masks[1])
        for key in ("saliency", "time_profile", "feature_profile", "logits", "attention"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7, err_msg=key)
        meta = json.loads(bytes(a["meta"]).decode())
        assert meta["method"] == "integrated_gradients" and meta["parameters"] == {"steps": 8}
        assert meta["class_names"] == ds.class_names and list(a["targets"]) == [0, 1]


def test_explain_same_input_any_format(files, server, tmp_path) -> None:
    """.csv (with a header) and .json of the same sequence give the same saliency."""
    tmp, _ = files
    out = []
    for name in ("one.csv", "one.json"):
        npz = tmp_path / f"{name}.npz"
        result = invoke("explain", tmp / name, "--png", tmp_path / f"{name}.png", "--npz", npz, "--url", server.url)
        assert result.exit_code == 0, result.output
        with np.load(npz) as z:
            out.append(z["saliency"])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


@pytest.mark.parametrize("where", ["local", "remote"])
def test_bad_files_end_cleanly(files, server, tmp_path, where) -> None:
    tmp, _ = files
    place = ["--store", STORE] if where == "local" else ["--url", server.url]
    narrow = invoke("predict", tmp / "narrow.csv", *place)
    assert narrow.exit_code == 2 and "Traceback" not in narrow.output
    assert "expected 100 features per time step, got 7" in " ".join(narrow.output.split())
    words = invoke("explain", tmp / "words.csv", "--png", tmp_path / "x.png", *place)
    assert words.exit_code == 2 and "line 2, column 2: 'four' is not a number" in " ".join(words.output.split())
    method = invoke("explain", tmp / "one.csv", "--method", "magic", "--png", tmp_path / "y.png", *place)
    assert method.exit_code == 2 and "method" in method.output and not (tmp_path / "y.png").exists()


def test_url_and_store_together_refused(files) -> None:
    tmp, _ = files
    result = invoke("predict", tmp / "one.csv", "--url", "http://127.0.0.1:9", "--store", STORE)
    assert result.exit_code == 2 and "not both" in result.output
