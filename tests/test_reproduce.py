"""The reproduction (issue 5): saliency-quality metrics on hand-made cases, `evaluate_saliency`
on models whose saliency is known, `icaserve evaluate` on an exported model, and the quick
reproduction asserting the paper's qualitative claim."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from training.evaluation import (
    box_time_mass,
    evaluate_saliency,
    minmax_scale,
    roc_auc,
    score_saliency,
    time_profile,
    topk_jaccard,
)


def _masks(n=3, T=10, N=8):
    m = np.zeros((n, T, N), dtype=bool)
    m[0, 0:3, 2:6] = True
    m[1, 4:9, 0:8] = True
    m[2, 7:10, 1:2] = True
    return m


# -- metrics on hand-made cases ----------------------------------------------------------------
def test_perfect_saliency_scores_perfectly():
    R = _masks()
    s = score_saliency(R.astype(float) * 3.5, R)  # any positive scale: min-max scaled away
    assert s["weighted_jaccard"] == pytest.approx(1.0)
    assert s["euclidean"] == pytest.approx(0.0)
    assert s["auc"] == pytest.approx(1.0)
    assert s["topk_jaccard"] == pytest.approx(1.0)
    assert s["box_time_mass"] == pytest.approx(1.0)
    assert s["n"] == 3


def test_sign_is_ignored():
    R = _masks()
    assert score_saliency(-R.astype(float), R) == score_saliency(R.astype(float), R)


def test_saliency_only_outside_the_box_scores_zero():
    R = _masks()
    s = score_saliency((~R).astype(float), R)
    assert s["weighted_jaccard"] == pytest.approx(0.0)
    assert s["auc"] == pytest.approx(0.0)
    assert s["topk_jaccard"] == pytest.approx(0.0)
    # ||R - (1 - R)|| = sqrt(T N): every cell is off by one.
    expected = np.mean([np.sqrt(R[i].size / R[i].sum()) for i in range(len(R))])
    assert s["euclidean"] == pytest.approx(expected)


def test_mostly_outside_the_box_is_near_zero():
    R = _masks()
    S = (~R).astype(float) + 0.01 * R  # tiny saliency inside
    s = score_saliency(S, R)
    assert s["weighted_jaccard"] < 0.01
    assert s["auc"] == pytest.approx(0.0)


@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
def test_constant_saliency_has_no_division_by_zero(value):
    R = _masks()
    S = np.full(R.shape, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn
        with np.errstate(all="raise"):
            s = score_saliency(S, R)
    assert minmax_scale(S).max() == 0.0  # a constant map scales to zeros
    assert s["weighted_jaccard"] == 0.0
    assert s["euclidean"] == pytest.approx(1.0)
    assert s["auc"] == pytest.approx(0.5)  # all ties
    assert 0.0 <= s["topk_jaccard"] <= 1.0


def test_undefined_samples_are_skipped_not_averaged():
    R = _masks()
    R[1] = False  # empty mask: no Euclidean, no AUC, no top-k
    s = score_saliency(R.astype(float), R)
    assert s["euclidean"] == pytest.approx(0.0)
    assert s["auc"] == pytest.approx(1.0)
    assert s["topk_jaccard"] == pytest.approx(1.0)
    # both zero: WJac undefined for that sample, the others are perfect
    assert s["weighted_jaccard"] == pytest.approx(1.0)
    R[:] = False
    s = score_saliency(np.zeros(R.shape), R)
    assert all(np.isnan(s[k]) for k in ("weighted_jaccard", "euclidean", "auc", "topk_jaccard"))


def test_weighted_jaccard_by_hand():
    R = np.array([[[1, 1, 0, 0]]], dtype=bool)
    S = np.array([[[1.0, 0.5, 0.25, 0.0]]])  # already in [0, 1] with min 0 and max 1
    s = score_saliency(S, R)
    assert s["weighted_jaccard"] == pytest.approx((1 + 0.5) / (1 + 1 + 0.25))
    assert s["euclidean"] == pytest.approx(np.sqrt(0.25 + 0.0625) / np.sqrt(2))
    assert s["auc"] == pytest.approx(1.0)
    assert s["topk_jaccard"] == pytest.approx(1.0)


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    R = rng.random((20, 6, 5)) < 0.3
    R[:, 0, 0], R[:, 0, 1] = True, False  # both classes present
    S = rng.integers(0, 4, size=R.shape).astype(float)  # many ties
    got = roc_auc(R, S)
    for i in range(len(R)):
        pos, neg = S[i][R[i]], S[i][~R[i]]
        diff = pos[:, None] - neg[None, :]
        expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
        assert got[i] == pytest.approx(expected)


def test_topk_jaccard_counts_overlap():
    R = np.zeros((1, 1, 6), dtype=bool)
    R[0, 0, :2] = True  # k = 2
    S = np.array([[[0.9, 0.1, 1.0, 0.0, 0.0, 0.0]]])  # top 2 = cells 2 and 0: overlap 1
    assert topk_jaccard(R, S)[0] == pytest.approx(1 / 3)


def test_box_time_mass():
    R = np.zeros((2, 4, 3), dtype=bool)
    R[:, 0, 1] = True  # the box covers time step 0 only
    S = np.ones((2, 4, 3))
    S[1, 0] = 0.0  # ... where the second map is zero
    S[1, 3, 0] = 5.0  # and non-constant
    got = box_time_mass(R, S)
    assert got[0] == pytest.approx(0.25)  # raw |S|, before any scaling: uniform over 4 steps
    assert got[1] == pytest.approx(0.0)


def test_time_profile_is_a_distribution():
    rng = np.random.default_rng(1)
    S = rng.standard_normal((4, 7, 3))
    S[2] = 0.0  # counts as uniform
    p = time_profile(S)
    assert p.shape == (7,)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(p >= 0)


# -- evaluate_saliency on models whose saliency is known ----------------------------------------
class BoxSum(torch.nn.Module):
    """logits = (-w.x, w.x) with w the box: the gradient of either class is +-box exactly."""

    def __init__(self, box: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("w", torch.as_tensor(box, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).sum(dim=(1, 2))
        return torch.stack([-s, s], dim=1)


def test_evaluate_saliency_on_a_model_with_known_gradient():
    from training.datasets import make_box_dataset

    ds = make_box_dataset("earlier_box", 40, T=10, N=10, seed=3)
    model = BoxSum(ds.masks[0])
    X = (ds.X - ds.X.mean()) / ds.X.std()
    s = evaluate_saliency(model, X, ds.y, ds.masks, method="gradient", batch=7)
    assert s["accuracy"] == 1.0
    assert s["weighted_jaccard"] == pytest.approx(1.0)
    assert s["euclidean"] == pytest.approx(0.0, abs=1e-7)
    assert s["auc"] == pytest.approx(1.0)
    assert s["n"] == 40
    # A model that looks at the wrong cells scores zero.
    wrong = evaluate_saliency(BoxSum(~ds.masks[0]), X, ds.y, ds.masks)
    assert wrong["weighted_jaccard"] == pytest.approx(0.0)
    assert wrong["auc"] == pytest.approx(0.0)


def test_evaluate_saliency_tsr_runs_batched():
    from training.datasets import make_box_dataset
    from training.models import ModelConfig, build_model

    ds = make_box_dataset("middle_box", 3, T=6, N=5, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=5, attention="ica", r=3, d_a=4, dropout=0.0)).eval()
    s = evaluate_saliency(model, ds.X, ds.y, ds.masks, method="tsr", batch=2)
    assert s["n"] == 3
    assert all(np.isfinite(s[k]) for k in ("weighted_jaccard", "euclidean", "auc", "topk_jaccard"))
    with pytest.raises(ValueError, match="method"):
        evaluate_saliency(model, ds.X, ds.y, ds.masks, method="occlusion-ish")
    with pytest.raises(ValueError, match="shape"):
        evaluate_saliency(model, ds.X, ds.y, ds.masks[:, :3])


# -- icaserve evaluate on an exported model ------------------------------------------------------
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    from training.datasets import synthetic_splits, train_val_split
    from training.models import ModelConfig
    from training.train import TrainConfig, save_checkpoint, train

    train_ds, test_ds = synthetic_splits("earlier_box", 120, 30, T=12, N=10, seed=0)
    fit, val = train_val_split(train_ds, 0.25, 0)
    cfg = ModelConfig(n_features=10, attention="ica", r=4, d_a=8)
    result = train(cfg, fit, val, TrainConfig(epochs=3, progress=False), test_ds)
    path = tmp_path_factory.mktemp("ckpt") / "ica.pt"
    save_checkpoint(path, result, train_ds.class_names, train_ds.feature_names, train_ds.n_steps, {"dataset": "earlier_box"})
    return path


def test_evaluate_an_exported_model(trained_checkpoint, tmp_path):
    from icaserve.cli import app
    from model_store import ModelStore
    from training.datasets import synthetic_splits
    from training.export import export_checkpoint
    from training.models import inference_copy
    from training.train import load_checkpoint

    store = ModelStore(tmp_path / "store")
    export_checkpoint(store, "ica-box", trained_checkpoint, with_onnx=False)
    out = tmp_path / "scores.json"
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--model", "ica-box", "--dataset", "earlier_box", "--store",
                              str(store.root), "--n-test", "30", "--json", str(out)])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    scores = payload["scores"]
    assert set(scores) >= {"accuracy", "weighted_jaccard", "euclidean", "auc", "topk_jaccard"}
    assert "ica-box v1" in payload["source"]

    # Same numbers as the eager checkpoint on the same test split, normalised the same way.
    model, ckpt = load_checkpoint(trained_checkpoint)
    _, test = synthetic_splits("earlier_box", 4, 30, 12, 10, 0)
    norm = ckpt["normalization"]
    X = (test.X - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    direct = evaluate_saliency(inference_copy(model), X, test.y, test.masks)
    for k in ("accuracy", "weighted_jaccard", "euclidean", "auc", "topk_jaccard"):
        assert scores[k] == pytest.approx(direct[k], abs=1e-5)
    assert scores["accuracy"] == pytest.approx(ckpt["metrics"]["test"]["accuracy"])


def test_evaluate_publishes_saliency_metrics(trained_checkpoint, tmp_path):
    from icaserve.cli import app
    from model_store import ModelStore

    root = tmp_path / "store"
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(trained_checkpoint), "--dataset", "earlier_box",
                                   "--n-test", "20", "--store", str(root), "--publish", "ica-scored"])
    assert res.exit_code == 0, res.output
    manifest = ModelStore(root).manifest("ica-scored")
    sal = manifest.metrics["saliency_gradient"]
    assert set(sal) >= {"accuracy", "weighted_jaccard", "euclidean", "auc", "topk_jaccard", "n"}
    assert sal["n"] == 20
    assert "test" in manifest.metrics  # the checkpoint's own metrics are kept


def test_evaluate_refuses_bad_requests(trained_checkpoint, tmp_path):
    from icaserve.cli import app

    runner = CliRunner()
    both = runner.invoke(app, ["evaluate", "--model", "x", "--checkpoint", str(trained_checkpoint),
                               "--dataset", "earlier_box"])
    assert both.exit_code == 2
    missing = runner.invoke(app, ["evaluate", "--model", "nope", "--dataset", "earlier_box",
                                  "--store", str(tmp_path / "empty")])
    assert missing.exit_code == 2 and "not found" in missing.output
    npz = tmp_path / "nomask.npz"
    np.savez(npz, X=np.zeros((4, 12, 10), np.float32), y=np.array([0, 1, 0, 1]))
    no_masks = runner.invoke(app, ["evaluate", "--checkpoint", str(trained_checkpoint), "--dataset", str(npz)])
    assert no_masks.exit_code == 2 and "masks" in no_masks.output
    pub = runner.invoke(app, ["evaluate", "--model", "nope", "--dataset", "earlier_box", "--publish", "x"])
    assert pub.exit_code == 2 and "--checkpoint" in pub.output


def test_evaluate_an_npz_with_masks(trained_checkpoint, tmp_path):
    from icaserve.cli import app
    from training.datasets import make_box_dataset

    ds = make_box_dataset("earlier_box", 10, T=12, N=10, seed=5)
    npz = tmp_path / "boxes.npz"
    np.savez(npz, X=ds.X, y=ds.y, masks=ds.masks)
    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(trained_checkpoint), "--dataset", str(npz),
                                   "--method", "tsr", "--samples", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())["scores"]
    assert scores["n"] == 2


# -- the quick reproduction: the paper's claim, the recipe, quality per method --------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    """The quick reproduction, run once for the tests below: both recipes, LSTM and ICA-LSTM."""
    from training.reproduce import ReproConfig, run_reproduction

    out = tmp_path_factory.mktemp("reproduce")
    return run_reproduction(ReproConfig.quick_mode(), out, progress=False), out


def test_quick_reproduction_shows_the_papers_claim(quick_run):
    """ICA-LSTM reaches high accuracy and a weighted Jaccard clearly above the plain LSTM's on
    the earlier box, where the LSTM's saliency has vanished before reaching the box."""
    from training.reproduce import claim_check

    result, out = quick_run
    by = {r["model"]: r for r in result["results"] if r["recipe"] == "paper"}
    lstm, ica = by["lstm"], by["ica_lstm"]
    assert ica["test_accuracy"] >= 0.95
    assert ica["gradient"]["weighted_jaccard"] > lstm["gradient"]["weighted_jaccard"] + 0.05
    assert lstm["gradient"]["weighted_jaccard"] < 0.02
    # LSTM saliency sits at the end of the sequence, outside the (early) box: AUC far below 0.5.
    assert lstm["gradient"]["auc"] < 0.2 < ica["gradient"]["auc"]
    late = np.asarray(lstm["profile"])[-5:].sum()
    assert late > 0.5 > np.asarray(ica["profile"])[-5:].sum()
    checks = claim_check(result["results"])  # on the paper's rows only, one per pair
    assert len(checks) == 1 and checks[0]["holds"]
    assert "tsr" in ica and ica["tsr"]["n"] == 4

    report = (out / "reproduction.md").read_text()
    assert "ICA-LSTM (matrix)" in report and "quick mode" in report
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["earlier_box_saliency.png", "earlier_box_time_profile.png", "recipe_saliency.png",
                       "time_profiles.png"]
    assert json.loads((out / "reproduction.json").read_text())["settings"]["quick"] is True


def test_quick_reproduction_runs_both_recipes_with_quality_per_method(quick_run):
    """Issue 11 part 3: every (model, recipe) is a record with its training settings and the
    per-method explanation quality (finite AUCs), TSR reused from the TSR run, not recomputed."""
    from training.evaluation import QUALITY_METHODS
    from training.train import RECIPES

    result, _ = quick_run
    records = result["results"]
    assert [(r["model"], r["recipe"]) for r in records] == [
        ("lstm", "paper"), ("lstm", "localise"), ("ica_lstm", "paper"), ("ica_lstm", "localise")]
    for r in records:
        cap = 30 if r["recipe"] == "localise" else (12 if r["model"] == "ica_lstm" else 40)
        assert r["epoch_cap"] == cap and 1 <= r["best_epoch"] <= r["epochs_run"] <= cap
        assert r["stopped"] in ("plateau", "cap")
        wd = RECIPES["localise"]["weight_decay"] if r["recipe"] == "localise" else 0.0
        assert r["training"]["weight_decay"] == wd
        assert r["training"]["select"] == ("loss" if r["recipe"] == "localise" else "accuracy")
        q = r["quality"]
        assert q["n_samples"] == 20 and q["dataset"] == "earlier_box"
        assert list(q["methods"]) == list(QUALITY_METHODS)  # TSR runs for both models in quick mode
        for name, scores in q["methods"].items():
            assert np.isfinite(scores["auc"]) and 0.0 <= scores["auc"] <= 1.0, (r["model"], name)
            assert scores["n"] == (4 if name == "tsr" else 20)
        # The quality's TSR entry scores the maps the TSR run made (same samples, same numbers).
        assert q["methods"]["tsr"]["auc"] == pytest.approx(r["tsr"]["auc"])
        assert 0.0 < q["chance"]["box_time_mass"] < 1.0
    json.dumps(result["results"], allow_nan=False)  # quality has no NaN
    assert all("recipe" in r for r in json.loads((quick_run[1] / "reproduction.json").read_text())["results"])


def test_quick_reproduction_report_has_recipe_sections_and_targets(quick_run):
    from training.reproduce import render_targets

    result, out = quick_run
    report = (out / "reproduction.md").read_text()
    for heading in ("## The paper's claim, checked", "## Training recipe vs the paper's settings",
                    "## Explanation quality per method", "## Targets (ICA-LSTM, recipe)"):
        assert heading in report
    recipe_table = report.split("## Training recipe vs the paper's settings")[1].split("\n## ")[0]
    assert recipe_table.count("| earlier_box |") == 4
    assert "| localise |" in recipe_table and "| paper |" in recipe_table
    targets = result["targets"]
    assert len(targets) == 4
    # Quick mode runs the earlier box only: measured there, the other datasets named as not run.
    acc = targets[0]
    assert [v["dataset"] for v in acc["values"]] == ["earlier_box"]
    assert "mixed_boxes" in acc["missing"] and acc["status"] in ("met (partial)", "NOT met")
    assert targets[2]["status"] == "not measured"  # mixed boxes only
    for line in render_targets(targets):
        assert line in report
    # The report's claim section keeps the paper's rows only (one row per pair, as before).
    claim = report.split("## The paper's claim, checked")[1].split("\n## ")[0]
    assert claim.count("| earlier_box |") == 1


def _record(dataset, model="ica_lstm", recipe="localise", acc=1.0, auc=0.95, best=None, chance=0.3, share=0.7):
    methods = {"gradient": {"auc": auc, "box_time_mass": share, "n": 10}}
    if best:
        methods[best[0]] = {"auc": best[1], "box_time_mass": best[2], "n": 10}
    return {"dataset": dataset, "model": model, "recipe": recipe, "label": "ICA-LSTM (matrix)",
            "test_accuracy": acc, "gradient": {"auc": auc, "box_time_mass": share}, "box_time_share": chance,
            "quality": {"accuracy": acc, "methods": methods, "chance": {"auc": 0.5, "box_time_mass": chance}}}


def test_targets_check_evaluates_the_four_targets():
    from training.reproduce import ALL_DATASETS, targets_check

    records = [_record(d) for d in ALL_DATASETS if d != "mixed_boxes"]
    records.append(_record("mixed_boxes", auc=0.6, best=("integrated_gradients", 0.85, 0.65), chance=0.6))
    records.append(_record("earlier_box", recipe="paper", acc=0.5, auc=0.5))  # ignored: not the recipe
    records.append(_record("earlier_box", model="lstm", acc=0.5, auc=0.1))  # ignored: not ICA-LSTM
    acc, grad_auc, mixed, box_time = targets_check(records)
    assert acc["status"] == "met" and grad_auc["status"] == "met" and not acc["missing"]
    assert mixed["status"] == "met" and mixed["values"][0]["method"] == "integrated_gradients"
    assert mixed["values"][0]["value"] == pytest.approx(0.85)
    # 2 x chance = 1.2 on mixed boxes: no share can reach it, and the check says NOT met.
    assert box_time["status"] == "NOT met"
    failed = [v for v in box_time["values"] if not v["met"]]
    assert [v["dataset"] for v in failed] == ["mixed_boxes"] and failed[0]["needed"] == pytest.approx(1.2)

    records[1] = _record("middle_box", acc=0.97, auc=0.89)
    acc, grad_auc, *_ = targets_check(records)
    assert acc["status"] == "NOT met" and grad_auc["status"] == "NOT met"
    assert [v["dataset"] for v in grad_auc["values"] if not v["met"]] == ["middle_box"]
    assert all(t["status"] == "not measured" for t in targets_check([_record("earlier_box", recipe="paper")]))
    nan = _record("earlier_box", auc=float("nan"))
    nan["quality"]["methods"]["gradient"]["auc"] = None
    assert targets_check([nan])[1]["status"] == "NOT met"  # a NaN AUC is not a pass


def test_repro_config_refuses_unknown_recipes_and_models():
    from icaserve.cli import app
    from training.reproduce import ReproConfig

    with pytest.raises(ValueError, match="recipe"):
        ReproConfig(recipes=["paper", "fancy"])
    with pytest.raises(ValueError, match="recipe"):
        ReproConfig(recipes=[])
    with pytest.raises(ValueError, match="model"):
        ReproConfig(recipe_models=["transformer"])
    with pytest.raises(ValueError, match="model"):
        ReproConfig(quality_models=["nope"])
    with pytest.raises(ValueError, match="localise_epochs"):
        ReproConfig(localise_epochs=0)
    with pytest.raises(ValueError, match="quality_samples"):
        ReproConfig(quality_samples=-1)
    with pytest.raises(ValueError, match="nothing to run"):
        ReproConfig(models=["lstm"], recipes=["localise"], recipe_models=["ica_lstm"])
    cfg = ReproConfig(models=["lstm", "ica_lstm"], recipe_models=["ica_lstm"], datasets=["earlier_box"])
    assert [(j.model, j.recipe) for j in cfg.jobs_list()] == [
        ("lstm", "paper"), ("ica_lstm", "paper"), ("ica_lstm", "localise")]
    assert cfg.train_config("ica_lstm", "localise").weight_decay > 0
    assert cfg.train_config("ica_lstm", "paper").epochs == cfg.ica_epochs

    res = CliRunner().invoke(app, ["reproduce", "--quick", "--recipes", "paper,fancy", "--no-progress"])
    assert res.exit_code == 2 and "fancy" in res.output


def test_reproduce_command_wires_the_recipe_flags_and_prints_the_targets(monkeypatch, tmp_path):
    """The flags reach ReproConfig; the checklist and the report path are printed at the end."""
    import training.reproduce as repro
    from icaserve.cli import app

    seen = {}

    def fake_run(cfg, out, *, progress=True, command=None):
        seen["cfg"] = cfg
        records = [_record("earlier_box")]
        return {"seconds": 1.0, "results": [], "targets": repro.targets_check(records)}

    monkeypatch.setattr(repro, "run_reproduction", fake_run)
    res = CliRunner().invoke(app, [
        "reproduce", "--datasets", "earlier_box,mixed_boxes", "--models", "lstm,ica_lstm,gru",
        "--recipes", "localise", "--recipe-models", "ica_lstm", "--localise-epochs", "7",
        "--quality-models", "ica_lstm,gru", "--quality-samples", "9", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.recipes == ["localise"] and cfg.recipe_models == ["ica_lstm"] and cfg.localise_epochs == 7
    assert cfg.quality_models == ["ica_lstm", "gru"] and cfg.quality_samples == 9
    # "localise" alone: only the recipe models run, one job per dataset.
    assert [(j.dataset, j.model, j.recipe) for j in cfg.jobs_list()] == [
        ("earlier_box", "ica_lstm", "localise"), ("mixed_boxes", "ica_lstm", "localise")]
    assert "Targets (ICA-LSTM, recipe)" in res.output
    assert "test accuracy >= 0.98 on every dataset: met (partial)" in res.output
    assert "reproduction.md" in res.output
