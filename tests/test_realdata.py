"""Real data, offline (issue 11, part 5): the UEA sets packaged with sktime load with the archive's
published shapes; `.ts` files are read by sktime's loader, good ones into a Dataset and broken ones
into a DatasetError naming the file and the line or field; unknown names list the packaged sets;
`icaserve train --dataset basic_motions` runs end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sktime", reason="the data extra (sktime) is not installed")

from training import realdata  # noqa: E402
from training.datasets import DatasetError, load  # noqa: E402

HEADER = """# a comment
@problemName Tiny
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equalLength {equal}
@classLabel true Up Down
@data
"""


def _write(path: Path, body: str, equal: str = "true", header: str | None = None) -> Path:
    path.write_text((HEADER.format(equal=equal) if header is None else header) + body)
    return path


GOOD_TRAIN = "1,2,3:4,5,6:Up\n3,2,1:6,5,4:Down\n1,1,2:4,4,5:Up\n3,3,2:6,6,5:Down\n"
GOOD_TEST = "1,2,4:4,5,7:Up\n3,2,0:6,5,3:Down\n"


@pytest.mark.parametrize(
    "name, n_train, n_test, steps, channels, n_classes",
    [("basic_motions", 40, 40, 100, 6, 4), ("japanese_vowels", 270, 370, 29, 12, 9)],
)
def test_packaged_sets_have_the_archive_shapes(name, n_train, n_test, steps, channels, n_classes):
    train, test = load(name)
    assert train.X.shape == (n_train, steps, channels) and test.X.shape == (n_test, steps, channels)
    assert train.X.dtype == np.float32 and train.y.dtype == np.int64
    assert len(train.class_names) == n_classes and set(np.unique(train.y)) == set(range(n_classes))
    assert set(np.unique(test.y)) == set(range(n_classes))
    assert train.feature_names == [f"dim_{i}" for i in range(channels)]
    assert np.isfinite(train.X).all() and np.isfinite(test.X).all()
    assert train.masks is None and train.name == name


def test_basic_motions_keeps_header_order_and_case():
    train, _ = realdata.load_packaged("BasicMotions")  # the archive name works too
    assert train.class_names == ["Standing", "Running", "Walking", "Badminton"]
    assert train.meta["padded_to"] is None


def test_japanese_vowels_is_padded_with_the_last_value_and_records_it():
    train, test = load("japanese_vowels")
    assert (train.meta["min_length"], train.meta["max_length"]) == (7, 26)
    assert test.meta["max_length"] == 29  # longer than any training series: both padded to 29, none cut
    assert train.meta["padded_to"] == 29 and "last value" in train.meta["padding"]
    i = int(np.argmin(train.meta["lengths"]))
    n = train.meta["lengths"][i]
    assert np.array_equal(train.X[i, n:], np.repeat(train.X[i, n - 1 : n], 29 - n, axis=0))


def test_a_good_ts_file_and_its_test_sibling_load(tmp_path):
    train_path = _write(tmp_path / "Tiny_TRAIN.ts", GOOD_TRAIN)
    _write(tmp_path / "Tiny_TEST.ts", GOOD_TEST)
    train, test = load(str(train_path))
    assert train.name == "Tiny" and train.class_names == ["Up", "Down"]
    assert train.X.shape == (4, 3, 2) and test.X.shape == (2, 3, 2)
    assert train.y.tolist() == [0, 1, 0, 1] and test.y.tolist() == [0, 1]
    assert train.X[0].tolist() == [[1, 4], [2, 5], [3, 6]]  # time x channel


def test_a_ts_file_without_sibling_has_no_test_split(tmp_path):
    train, test = load(str(_write(tmp_path / "alone.ts", GOOD_TRAIN)))
    assert test is None and len(train) == 4


def test_unequal_lengths_are_padded_to_the_longest_of_train_and_test(tmp_path):
    train_path = _write(tmp_path / "V_TRAIN.ts", "1,2:4,5:Up\n3,2,1:6,5,4:Down\n", equal="false")
    _write(tmp_path / "V_TEST.ts", "1,2,3,4:4,5,6,7:Up\n", equal="false")
    train, test = load(str(train_path))
    assert train.n_steps == test.n_steps == 4
    assert train.X[0, :, 0].tolist() == [1, 2, 2, 2] and train.meta["lengths"] == [2, 3]


@pytest.mark.parametrize(
    "case, body, header, expect",
    [
        ("bad header", GOOD_TRAIN, HEADER.format(equal="true").replace("@univariate false", "@univariate maybe"),
         ["line 5", "@univariate"]),
        ("a non-number", "1,2,3:4,5,6:Up\n3,2,x:6,5,4:Down\n", None, ["line 11", "'x'"]),
        ("wrong dims count", "1,2,3:4,5,6:Up\n3,2,1:6,5,4:7,8,9:Down\n", None, ["line 11", "dimensions"]),
        ("missing @data", GOOD_TRAIN, HEADER.format(equal="true").replace("@data\n", ""), ["@data"]),
        ("label not in @classLabel", "1,2,3:4,5,6:Up\n3,2,1:6,5,4:Sideways\n", None, ["['sideways']", "@classLabel"]),
        ("no header at all", GOOD_TRAIN, "", ["no .ts header"]),
        ("missing value", "1,?,3:4,5,6:Up\n3,2,1:6,5,4:Down\n", None, ["case 1", "missing"]),
    ],
)
def test_broken_ts_files_name_the_file_and_where(tmp_path, case, body, header, expect):
    path = _write(tmp_path / "broken_TRAIN.ts", body, header=header)
    with pytest.raises(DatasetError) as err:
        load(str(path))
    message = str(err.value)
    assert str(path) in message, case
    for part in expect:
        assert part.lower() in message.lower(), (case, message)


def test_a_broken_test_sibling_is_named(tmp_path):
    train_path = _write(tmp_path / "S_TRAIN.ts", GOOD_TRAIN)
    sibling = _write(tmp_path / "S_TEST.ts", "1,2,3:4,5,6:Up\n3,2:Down\n")
    with pytest.raises(DatasetError, match="S_TEST.ts"):
        load(str(train_path))
    assert sibling.exists()


def test_missing_ts_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no_such_TRAIN.ts: no such file"):
        load(str(tmp_path / "no_such_TRAIN.ts"))


def test_unknown_names_list_the_packaged_sets():
    with pytest.raises(DatasetError) as err:
        realdata.load_packaged("eeg_eye_state")
    assert "basic_motions" in str(err.value) and "japanese_vowels" in str(err.value)
    with pytest.raises(DatasetError) as err:
        load("eeg_eye_state")
    assert "basic_motions" in str(err.value) and "japanese_vowels" in str(err.value)


def test_without_sktime_the_error_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sktime" else real_find_spec(name, *a))
    with pytest.raises(DatasetError, match=r"icaserve\[data\]"):
        load("basic_motions")
    with pytest.raises(DatasetError, match=r"icaserve\[data\]"):
        load(str(_write(tmp_path / "x.ts", GOOD_TRAIN)))


def test_cli_trains_on_a_packaged_set(tmp_path):
    from typer.testing import CliRunner

    from icaserve.cli import app
    from training.train import load_checkpoint

    out = tmp_path / "bm.pt"
    result = CliRunner().invoke(app, ["train", "--dataset", "basic_motions", "--epochs", "2", "--hidden", "4",
                                      "--hops", "2", "--d-a", "4", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, ckpt = load_checkpoint(out)
    assert ckpt["feature_names"] == [f"dim_{i}" for i in range(6)] and ckpt["train_length"] == 100
    assert ckpt["class_names"] == ["Standing", "Running", "Walking", "Badminton"]
    assert "test" in ckpt["metrics"] and ckpt["training"]["dataset"] == "basic_motions"


def test_cli_names_a_broken_ts_file(tmp_path):
    from typer.testing import CliRunner

    from icaserve.cli import app

    path = _write(tmp_path / "bad.ts", "1,2,3:4,5,6:Up\n3,2,x:6,5,4:Down\n")
    result = CliRunner().invoke(app, ["train", "--dataset", str(path), "--epochs", "1", "--device", "cpu",
                                      "--out", str(tmp_path / "never.pt")])
    flat = "".join(result.output.split())  # rich may wrap a long temporary path
    assert result.exit_code == 2 and "bad.ts" in flat and "line11" in flat
    assert "Traceback" not in result.output and not (tmp_path / "never.pt").exists()


def test_nearest_neighbour_baselines_on_basic_motions():
    """The report's 1-NN baselines: DTW beats ED on the periodic motion data (deterministic)."""
    train, test = load("basic_motions")
    scores = realdata.nearest_neighbour_baselines(train, test)
    assert scores == {"ed": pytest.approx(0.6), "dtw_d": pytest.approx(0.975)}
    same = realdata.nearest_neighbour_baselines(train, train)
    assert same == {"ed": 1.0, "dtw_d": 1.0}
