"""Training: a tiny ICA-LSTM learns a small earlier_box; selection looks at validation only;
checkpoints round-trip; seeds repeat; `torchrun -m icaserve.cli train` runs DDP on CPU (gloo)
with one checkpoint from rank 0 and a different data shard per rank; and DDP does its job: after
steps on different shards every rank holds the same weights, equal to one process stepping on the
union of the shards (tests/test_cuda.py runs the same check with nccl)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from training.datasets import Dataset, synthetic_splits, train_val_split
from training.models import ModelConfig
from training.datasets import Standardizer
from training.train import (
    CHECKPOINT_FORMAT,
    TrainConfig,
    TrainResult,
    attention_entropy,
    load_checkpoint,
    recipe_for,
    recipe_model,
    save_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parent.parent
T, N = 20, 8
TINY = ModelConfig(n_features=N, attention="ica", r=4, d_a=8, hidden=5)


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset, Dataset]:
    train_ds, test_ds = synthetic_splits("earlier_box", 200, 60, T=T, N=N, seed=0)
    fit, val = train_val_split(train_ds, 0.25, seed=0)
    return fit, val, test_ds


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=8, batch_size=25, lr=1e-2, patience=8, seed=0, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(data) -> TrainResult:
    fit, val, test = data
    return train(TINY, fit, val, _cfg(), test)


def test_tiny_ica_lstm_learns_earlier_box(trained: TrainResult) -> None:
    m = trained.metrics
    assert set(m) == {"train", "validation", "test"}
    assert m["validation"]["accuracy"] >= 0.9, m
    assert m["test"]["accuracy"] >= 0.85, m
    assert m["train"]["loss"] < 0.69  # better than chance (ln 2)
    assert not trained.model.training  # returned in eval mode, on the CPU
    assert next(trained.model.parameters()).device.type == "cpu"
    assert trained.seconds > 0
    assert 1 <= trained.best_epoch <= len(trained.history) <= 8
    keys = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(set(row) == keys for row in trained.history)
    assert [row["epoch"] for row in trained.history] == list(range(1, len(trained.history) + 1))


def test_standardizer_is_fitted_on_the_training_split(trained: TrainResult, data) -> None:
    fit, _, _ = data
    np.testing.assert_allclose(trained.standardizer.mean, fit.X.mean(axis=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(trained.standardizer.std, fit.X.std(axis=(0, 1)), atol=1e-5)


def _best_by_validation(history: list[dict[str, float]]) -> int:
    """The epoch with the highest validation accuracy, ties to the lower validation loss, then earliest."""
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["epoch"]))
    return int(best["epoch"])


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_selection_uses_validation_only(data, lr: float) -> None:
    fit, val, test = data
    cfg = _cfg(lr=lr, epochs=6, patience=6)
    result = train(TINY, fit, val, cfg, test)
    h = result.history
    assert result.best_epoch == _best_by_validation(h)
    # The returned weights are those of the best epoch, not of the last one.
    best_row = h[result.best_epoch - 1]
    assert result.metrics["validation"]["accuracy"] == pytest.approx(best_row["val_accuracy"])
    assert result.metrics["validation"]["loss"] == pytest.approx(best_row["val_loss"], rel=1e-4, abs=1e-6)
    # The test set plays no part: without it, or with its labels flipped, the same model comes out.
    flipped = Dataset(test.X, 1 - test.y, test.class_names, test.feature_names, test.masks, "flipped")
    for other_test in (None, flipped):
        again = train(TINY, fit, val, cfg, other_test)
        assert again.best_epoch == result.best_epoch
        assert again.history == h
        for (k, a), b in zip(result.model.state_dict().items(), again.model.state_dict().values()):
            assert torch.equal(a, b), k
    assert "test" not in train(TINY, fit, val, _cfg(epochs=1)).metrics


def test_selection_follows_validation_even_against_training(data) -> None:
    """A validation split with flipped labels disagrees with training at every step: the selected
    epoch must be validation's favourite (an early, barely trained one), not the last or the best
    on training data, and the weights returned must be that epoch's."""
    fit, val, test = data
    flipped = Dataset(val.X, 1 - val.y, val.class_names, val.feature_names, val.masks, "flipped-val")
    result = train(TINY, fit, flipped, _cfg(lr=1e-3, epochs=6, patience=10), test)
    h = result.history
    assert result.best_epoch == _best_by_validation(h)
    assert result.best_epoch < len(h)
    best_row, last_row = h[result.best_epoch - 1], h[-1]
    assert result.metrics["validation"]["accuracy"] == pytest.approx(best_row["val_accuracy"])
    assert result.metrics["validation"]["loss"] == pytest.approx(best_row["val_loss"], rel=1e-4)
    assert result.metrics["validation"]["loss"] != pytest.approx(last_row["val_loss"], rel=1e-3)


def test_early_stopping_counts_epochs_without_validation_improvement(data) -> None:
    fit, val, _ = data
    result = train(TINY, fit, val, _cfg(lr=3e-2, epochs=40, patience=2))
    # Stopped either at the end or exactly `patience` epochs after the best one.
    assert len(result.history) in (40, result.best_epoch + 2)
    assert len(result.history) < 40  # this easy task saturates validation quickly
    assert result.best_epoch == _best_by_validation(result.history)
    best_row = result.history[result.best_epoch - 1]
    assert result.metrics["validation"]["loss"] == pytest.approx(best_row["val_loss"], rel=1e-4, abs=1e-7)


def test_checkpoint_round_trip(trained: TrainResult, tmp_path: Path) -> None:
    info = {"dataset": "earlier_box", "note": "test"}
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", trained, ["neg", "pos"], [f"f{i}" for i in range(N)], T, info)
    assert path.is_file()
    model, ckpt = load_checkpoint(path)
    assert not model.training
    assert model.config == trained.model.config
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["class_names"] == ["neg", "pos"]
    assert ckpt["feature_names"] == [f"f{i}" for i in range(N)]
    assert ckpt["train_length"] == T
    assert ckpt["metrics"] == trained.metrics
    np.testing.assert_allclose(ckpt["normalization"]["mean"], trained.standardizer.mean)
    np.testing.assert_allclose(ckpt["normalization"]["std"], trained.standardizer.std)
    assert ckpt["training"]["note"] == "test"
    assert ckpt["training"]["best_epoch"] == trained.best_epoch
    assert ckpt["training"]["epochs_run"] == len(trained.history)
    for a, b in zip(trained.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(5, 13, N)  # any length
    with torch.no_grad():
        assert torch.equal(trained.model.eval()(x), model(x))


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an icaserve checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_seed_makes_runs_repeatable(data) -> None:
    fit, val, _ = data
    cfg = _cfg(epochs=2)
    a = train(TINY, fit, val, cfg)
    b = train(TINY, fit, val, cfg)
    c = train(TINY, fit, val, _cfg(epochs=2, seed=1))
    assert a.history == b.history and a.best_epoch == b.best_epoch
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values()))


# -- recipe flags (issue 11) ------------------------------------------------------------------
def _weight_norm(model) -> float:
    return float(sum(p.detach().pow(2).sum() for p in model.parameters()).sqrt())


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_weight_decay_shrinks_weights(data, optimizer: str) -> None:
    """Same seed, same data, same steps: weight decay (coupled L2 for adam, decoupled for adamw)
    ends with smaller weights than none; the optimizer in use is the one asked for."""
    fit, val, _ = data
    base = dict(epochs=4, patience=10, optimizer=optimizer)
    plain = train(TINY, fit, val, _cfg(**base, weight_decay=0.0))
    # adamw shrinks by (1 - lr * wd) a step (24 steps here); adam's L2 acts through the gradient
    decayed = train(TINY, fit, val, _cfg(**base, weight_decay=0.5 if optimizer == "adam" else 5.0))
    assert _weight_norm(decayed.model) < 0.9 * _weight_norm(plain.model)


def test_adamw_decay_is_decoupled(data) -> None:
    """With lr * wd = 0.5 per step, AdamW multiplies every weight by (1 - 0.5) before its Adam step,
    which adam's L2 term (normalised away by its second moment) does not: the two differ."""
    fit, val, _ = data
    a = train(TINY, fit, val, _cfg(epochs=1, optimizer="adam", weight_decay=50.0))
    w = train(TINY, fit, val, _cfg(epochs=1, optimizer="adamw", weight_decay=50.0))
    assert _weight_norm(w.model) < 0.5 * _weight_norm(a.model)


def test_plateau_stop_ends_before_the_cap_and_restores_the_best_epoch(data) -> None:
    """select="loss" with a min_delta no epoch can beat: the first epoch stays best, training stops
    `patience` epochs later, far below the cap, and the weights are the first epoch's."""
    fit, val, _ = data
    result = train(TINY, fit, val, _cfg(epochs=200, patience=3, select="loss", min_delta=10.0))
    assert result.stopped == "plateau"
    assert result.best_epoch == 1 and len(result.history) == 4
    assert result.metrics["validation"]["loss"] == pytest.approx(result.history[0]["val_loss"], rel=1e-4)


def test_min_delta_counts_only_large_enough_drops(data) -> None:
    fit, val, _ = data
    delta = 0.02
    result = train(TINY, fit, val, _cfg(lr=1e-2, epochs=12, patience=12, select="loss", min_delta=delta))
    best, best_epoch = float("inf"), 0
    for row in result.history:  # the rule, replayed on the recorded validation losses
        if row["val_loss"] < best - delta:
            best, best_epoch = row["val_loss"], row["epoch"]
    assert result.best_epoch == best_epoch
    assert result.metrics["validation"]["loss"] == pytest.approx(best, rel=1e-4)
    assert result.stopped == "cap" and len(result.history) == 12


def test_cosine_schedule_anneals_to_lr_min(data) -> None:
    fit, val, _ = data
    result = train(TINY, fit, val, _cfg(lr=1e-2, epochs=4, lr_schedule="cosine", lr_min=1e-4))
    lrs = [row["lr"] for row in result.history]
    expected = [1e-4 + (1e-2 - 1e-4) * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected)
    none = train(TINY, fit, val, _cfg(lr=1e-2, epochs=3))
    assert [row["lr"] for row in none.history] == [1e-2] * 3


def test_plateau_schedule_halves_the_lr_when_validation_stalls(data) -> None:
    """Flipped validation labels: the better the model learns, the worse the validation loss, so
    it stalls at once and the plateau schedule halves the rate after every lr_patience + 1 stale epochs."""
    fit, val, _ = data
    flipped = Dataset(val.X, 1 - val.y, val.class_names, val.feature_names, val.masks, "flipped-val")
    result = train(TINY, fit, flipped, _cfg(lr=1e-2, epochs=6, patience=10, lr_schedule="plateau", lr_patience=1))
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] == 1e-2 and min(lrs) <= 0.5e-2
    assert all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:]))  # only ever halved


def _explicit_entropy(scores: torch.Tensor) -> torch.Tensor:
    """The same quantity from the (B, r, T, T) attention matrices, for checking."""
    b, t, r = scores.shape
    e = scores.double().transpose(1, 2).unsqueeze(2).expand(b, r, t, t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    a = torch.softmax(e.masked_fill(~causal, float("-inf")), dim=-1)  # (B, r, T, T)
    h = -(torch.where(a > 0, a * a.log(), torch.zeros_like(a))).sum(-1)  # (B, r, T)
    norm = torch.log(torch.arange(1, t + 1, dtype=torch.float64))
    return (h[..., 1:] / norm[1:]).mean()


def test_attention_entropy_equals_the_explicit_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 9, 4, generator=gen) * 5
    assert float(attention_entropy(scores)) == pytest.approx(float(_explicit_entropy(scores)), rel=1e-5)
    # uniform attention has entropy log(t+1) in every row: normalised, exactly 1; one-hot-like: ~0
    assert float(attention_entropy(torch.zeros(2, 7, 3))) == pytest.approx(1.0)
    peaked = torch.zeros(1, 6, 1)
    peaked[0, 0, 0] = 200.0  # every row's mass on step 0
    assert float(attention_entropy(peaked)) < 1e-6
    assert float(attention_entropy(torch.zeros(2, 1, 3))) == 0.0  # one step: nothing to spread
    # differentiable, finite for extreme scores (float64 inside)
    s = (torch.randn(2, 30, 3, generator=gen) * 40).requires_grad_(True)
    attention_entropy(s).backward()
    assert torch.isfinite(s.grad).all()


def test_attention_entropy_penalty_sharpens_the_attention(data) -> None:
    fit, val, _ = data
    x = torch.from_numpy(Standardizer.fit(fit.X).apply(val.X))
    plain = train(TINY, fit, val, _cfg(epochs=3))
    sharp = train(TINY, fit, val, _cfg(epochs=3, attention_entropy=5.0))
    with torch.no_grad():
        h_plain = float(attention_entropy(plain.model.encoder.scores(x)))
        h_sharp = float(attention_entropy(sharp.model.encoder.scores(x)))
    assert h_sharp < h_plain - 0.05
    assert "train_attention_entropy" in sharp.history[0] and "train_attention_entropy" not in plain.history[0]
    with pytest.raises(ValueError, match="input-cell attention"):
        train(ModelConfig(n_features=N), fit, val, _cfg(epochs=1, attention_entropy=1.0))


def test_recipes_and_config_validation() -> None:
    loc = TrainConfig.from_recipe("localise")
    assert (loc.recipe, loc.optimizer, loc.weight_decay, loc.select, loc.epochs) == ("localise", "adam", 1e-2, "loss", 500)
    assert loc.min_delta > 0 and loc.patience >= 15
    classic = TrainConfig.from_recipe("classic", epochs=7, weight_decay=None)  # None: not given
    assert (classic.epochs, classic.weight_decay, classic.select, classic.optimizer) == (7, 0.0, "accuracy", "adam")
    assert recipe_for("ica") == "localise" and recipe_for("none") == "classic" and recipe_for("self") == "classic"
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig.from_recipe("fastest")
    # the recipe frees the ICA attention's weights of the decay and widens ICA models' cells
    assert loc.attention_weight_decay == 0.0 and classic.attention_weight_decay is None
    assert recipe_model("localise", "ica") == {"hidden": 64}
    assert recipe_model("localise", "none") == recipe_model("localise", "self") == recipe_model("classic", "ica") == {}


@pytest.mark.parametrize(("flags", "hidden", "attention_wd"), [
    ([], 64, 0.0),  # an ICA model takes the localise recipe, and its width
    (["--recipe", "classic"], 5, None),
    (["--hidden", "7"], 7, 0.0),  # a given width wins
    (["--attention-weight-decay", "0.01"], 64, 0.01),
])
def test_cli_train_takes_the_recipes_model_width_unless_given(tmp_path: Path, flags, hidden, attention_wd) -> None:
    from typer.testing import CliRunner

    from icaserve.cli import app

    args = ["train", "--dataset", "earlier_box", "--length", "6", "--features", "4", "--n-train", "24",
            "--n-test", "4", "--hops", "2", "--d-a", "3", "--device", "cpu", "--epochs", "1",
            "--out", str(tmp_path / "m.pt"), *flags]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    _, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["config"]["hidden"] == hidden
    assert ckpt["training"]["attention_weight_decay"] == attention_wd
    for bad in ({"optimizer": "sgd"}, {"select": "f1"}, {"lr_schedule": "step"}, {"weight_decay": -1.0},
                {"min_delta": float("nan")}, {"epochs": 0}, {"attention_entropy": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_cli_train_records_the_recipe_in_checkpoint_and_manifest(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from icaserve.cli import app
    from model_store import ModelStore

    args = ["train", "--dataset", "earlier_box", "--length", "10", "--features", "5", "--n-train", "60",
            "--n-test", "10", "--hops", "2", "--d-a", "4", "--hidden", "3", "--device", "cpu",
            "--epochs", "2", "--lr-schedule", "cosine", "--attention-entropy", "0.1",
            "--out", str(tmp_path / "m.pt"), "--export", "recipe-model", "--store", str(tmp_path / "store")]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    _, ckpt = load_checkpoint(tmp_path / "m.pt")
    tr = ckpt["training"]
    assert tr["recipe"] == "localise"  # the default for an ICA model
    assert (tr["optimizer"], tr["weight_decay"], tr["select"], tr["lr_schedule"], tr["attention_entropy"]) == (
        "adam", 1e-2, "loss", "cosine", 0.1)
    assert tr["epochs"] == 2 and tr["stopped"] == "cap" and tr["min_delta"] == 1e-4
    manifest = ModelStore(tmp_path / "store").manifest("recipe-model")
    for key in ("recipe", "optimizer", "weight_decay", "patience", "min_delta", "select", "lr_schedule",
                "attention_entropy", "epochs", "stopped", "best_epoch"):
        assert manifest.training[key] == tr[key], key

    plain = CliRunner().invoke(app, [*args[:17], "--attention", "none", "--epochs", "1", "--out", str(tmp_path / "p.pt")])
    assert plain.exit_code == 0, plain.output
    assert load_checkpoint(tmp_path / "p.pt")[1]["training"]["recipe"] == "classic"
    for bad in (["--optimizer", "sgd"], ["--recipe", "fastest"], ["--attention", "none", "--attention-entropy", "1"],
                ["--attention", "none", "--attention-weight-decay", "0"]):
        res = CliRunner().invoke(app, [*args[:17], *bad, "--epochs", "1", "--out", str(tmp_path / "x.pt")])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output


# -- DDP --------------------------------------------------------------------------------------

# Loaded by Python's `site` in every process of the torchrun run (it is first on PYTHONPATH):
# records the indices each rank's DistributedSampler hands to its DataLoader, so the test can see
# the shards without any hook in the training code.
_SHARD_LOGGER = textwrap.dedent(
    """
    import json, os
    _LOG = os.environ.get("ICASERVE_TEST_SHARD_LOG")
    if _LOG:
        from torch.utils.data import DistributedSampler

        _orig = DistributedSampler.__iter__

        def _logged(self):
            idx = [int(i) for i in _orig(self)]
            name = os.path.join(_LOG, f"rank{self.rank}-epoch{self.epoch}.json")
            with open(name, "w") as f:
                json.dump({"rank": self.rank, "world": self.num_replicas, "epoch": self.epoch,
                           "env_rank": os.environ.get("RANK"), "indices": idx}, f)
            return iter(idx)

        DistributedSampler.__iter__ = _logged
    """
)


def test_ddp_two_ranks_gloo_cpu(tmp_path: Path) -> None:
    import icaserve.cli

    assert 'if __name__ == "__main__"' in Path(icaserve.cli.__file__).read_text()  # so `-m icaserve.cli` runs
    hook, log, out, work = (tmp_path / d for d in ("hook", "log", "out", "work"))
    for d in (hook, log, out, work):
        d.mkdir()
    (hook / "sitecustomize.py").write_text(_SHARD_LOGGER)
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    n_train, epochs = 100, 2  # 80 fit + 20 validation; 40 samples per rank
    # Note: torchrun's own argparse would take `--r` as an ambiguous abbreviation of its options,
    # so this run keeps the default r.
    cmd = launcher + [
        "--standalone", "--nproc_per_node", "2", "-m", "icaserve.cli", "train",
        "--dataset", "earlier_box", "--length", str(T), "--features", str(N), "--n-train", str(n_train),
        "--n-test", "20", "--epochs", str(epochs), "--batch-size", "10", "--d-a", "8", "--hidden", "4",
        "--patience", "5", "--device", "cpu", "--out", str(out / "model.pt"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "ICASERVE_TEST_SHARD_LOG": str(log),
        "OMP_NUM_THREADS": "1",
        "ICASERVE_STORE": str(tmp_path / "store"),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    # Exactly one checkpoint, written by rank 0; nothing else anywhere.
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert list(work.iterdir()) == []
    assert proc.stderr.count("checkpoint:") + proc.stdout.count("checkpoint:") == 1
    model, ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["training"]["n_train"] == 80 and ckpt["training"]["n_val"] == 20
    assert ckpt["training"]["epochs_run"] == epochs
    assert model.config.n_features == N

    # Each rank saw its own half of the training split, every epoch.
    shards = {}
    for f in log.iterdir():
        rec = json.loads(f.read_text())
        assert rec["world"] == 2 and str(rec["rank"]) == rec["env_rank"]
        shards[rec["rank"], rec["epoch"]] = rec["indices"]
    assert set(shards) == {(r, e) for r in (0, 1) for e in range(1, epochs + 1)}
    for e in range(1, epochs + 1):
        a, b = shards[0, e], shards[1, e]
        assert len(a) == len(b) == 40
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(80))
    assert shards[0, 1] != shards[0, 2]  # reshuffled per epoch (set_epoch)


# -- DDP does its job: identical ranks, equal to one process on the union of the shards -------------

# One rank of a DDP run of `training.train.train`, started with torchrun's environment (RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). It records the process group's backend, the
# models wrapped in DistributedDataParallel and the indices its DistributedSampler hands out, and
# saves the weights train() returns. Options in the spec (tests/test_cuda.py uses them):
# `strict_fp32` turns TF32 off (cuDNN's RNNs use it when allowed), `world1_backend` sets up a
# process group of one here and lets train() use DDP in it (one GPU: nccl cannot put two ranks on
# one device).
DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    spec, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    if spec.get("strict_fp32"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    shards, backends, wrapped = [], [], []
    _iter, _init = DistributedSampler.__iter__, dist.init_process_group
    _ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def _recording_ddp_init(self, module, *args, **kwargs):
        wrapped.append(str(next(module.parameters()).device))
        _ddp_init(self, module, *args, **kwargs)

    def _recording_iter(self):
        idx = [int(i) for i in _iter(self)]
        shards.append(idx)
        return iter(idx)

    def _recording_init(backend=None, *args, **kwargs):
        backends.append(backend)
        return _init(backend, *args, **kwargs)

    DistributedSampler.__iter__ = _recording_iter
    dist.init_process_group = _recording_init
    torch.nn.parallel.DistributedDataParallel.__init__ = _recording_ddp_init

    from training.datasets import synthetic_splits, train_val_split
    from training.models import ModelConfig
    from training.train import Distributed, TrainConfig, train

    if spec.get("world1_backend"):
        dist.init_process_group(spec["world1_backend"], rank=0, world_size=1)
        Distributed.enabled = property(lambda self: dist.is_initialized())

    train_ds, _ = synthetic_splits("earlier_box", spec["n_train"], 10, T=spec["T"], N=spec["N"], seed=0)
    fit, val = train_val_split(train_ds, spec["val_fraction"], seed=0)
    result = train(ModelConfig(**spec["model"]), fit, val, TrainConfig(**spec["train"]))
    torch.save({"state": {k: v.cpu() for k, v in result.model.state_dict().items()}, "shards": shards,
                "backends": backends, "wrapped": wrapped, "epochs_run": len(result.history)}, out)
    """
)

# 60 fit + 20 validation samples; 2 ranks x 30 samples = 3 steps of 10 per rank in one epoch.
DDP_SPEC: dict = {
    "n_train": 80, "val_fraction": 0.25, "T": 12, "N": 6,
    "model": {"n_features": 6, "attention": "ica", "r": 3, "d_a": 6, "hidden": 5, "dropout": 0.0},
    "train": {"epochs": 1, "batch_size": 10, "lr": 1e-2, "patience": 5, "seed": 0, "progress": False},
}


def run_ddp_ranks(tmp_path: Path, world: int, device: str, timeout_s: float = 240.0, **options) -> list[dict]:
    """Run `world` ranks of DDP_WORKER on loopback (as torchrun would start them); their saves."""
    from conftest import free_port

    spec = json.loads(json.dumps(DDP_SPEC))
    spec["train"]["device"] = device
    spec.update(options)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
                "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    procs, logs = [], []
    for rank in range(world):
        log = open(tmp_path / f"rank{rank}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", DDP_WORKER, json.dumps(spec), str(tmp_path / f"rank{rank}.pt")],
            cwd=tmp_path, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:  # a rank that fails leaves the others waiting in a collective: bounded
            p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    outputs = "\n".join(f"-- rank {r}:\n" + (tmp_path / f"rank{r}.log").read_text(errors="replace")[-2000:]
                        for r in range(world))
    assert [p.returncode for p in procs] == [0] * world, outputs
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def union_reference(shards: list[list[int]], steps_of: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """One process, the same initial weights and optimiser, each step on the union of the ranks'
    batches of that step: what DDP's gradient averaging must reproduce. With one shard: that
    shard trained alone (what a rank would hold without DDP)."""
    from training.datasets import Standardizer
    from training.models import build_model
    from training.train import _tensors

    spec = DDP_SPEC
    train_ds, _ = synthetic_splits("earlier_box", spec["n_train"], 10, T=spec["T"], N=spec["N"], seed=0)
    fit, _ = train_val_split(train_ds, spec["val_fraction"], seed=0)
    data = _tensors(fit, Standardizer.fit(fit.X))
    cfg = TrainConfig(**spec["train"])
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(**spec["model"])).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = cfg.batch_size
    for step in range(steps_of):
        idx = [i for shard in shards for i in shard[step * bs:(step + 1) * bs]]
        xb, yb = (t.to(device) for t in data[idx])
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def check_ddp_equivalence(saves: list[dict], backend: str, tol: float, device: str = "cpu") -> None:
    """Every rank the same weights, equal to one process on the union of the shards, and (with
    several ranks) clearly not what one rank alone would have learnt."""
    world = len(saves)
    fit_size = DDP_SPEC["n_train"] - round(DDP_SPEC["n_train"] * DDP_SPEC["val_fraction"])
    shards = []
    for save in saves:
        assert save["backends"] == [backend]
        assert len(save["wrapped"]) == 1 and save["wrapped"][0].startswith(device), save["wrapped"]
        assert save["epochs_run"] == 1 and len(save["shards"]) == 1  # one epoch: one pass of the sampler
        shards.append(save["shards"][0])
    assert sorted(i for s in shards for i in s) == list(range(fit_size))  # disjoint, covering the split
    steps = fit_size // world // DDP_SPEC["train"]["batch_size"]
    assert steps >= 2
    for save in saves[1:]:
        assert max_abs_diff(save["state"], saves[0]["state"]) <= tol / 10, "ranks disagree"
    union = union_reference(shards, steps, device)
    diff = max_abs_diff(saves[0]["state"], union)
    assert diff <= tol, f"DDP result differs from one process on the union of the shards by {diff:.3g}"
    # the check can tell: each rank alone on its own shard ends up far from that
    for shard in shards if world > 1 else []:
        alone = max_abs_diff(union_reference([shard], steps, device), union)
        assert alone > 100 * tol, alone


def test_ddp_ranks_agree_and_equal_one_process_on_the_union(tmp_path: Path) -> None:
    """What DDP is for: after three steps on different shards (gloo, 2 ranks on loopback), both
    ranks hold the same parameters, equal (to float rounding) to a single process stepping on the
    union of the two ranks' batches. With the DistributedDataParallel wrapper replaced by the bare
    model each rank would follow its own shard and this fails."""
    saves = run_ddp_ranks(tmp_path, world=2, device="cpu")
    check_ddp_equivalence(saves, backend="gloo", tol=1e-5)


def test_attention_weight_decay_gets_a_group_of_its_own() -> None:
    """--attention-weight-decay: the ICA attention's weights (encoder w1, w2) in their own optimizer
    group (the localise recipe's default, at 0); unset (classic) or equal to the rest it is one
    group, as before; negative is refused."""
    from training.models import build_model
    from training.train import _optimizer

    net = build_model(TINY)
    one = _optimizer(net, TrainConfig.from_recipe("classic", weight_decay=1e-2))
    assert len(one.param_groups) == 1 and one.param_groups[0]["weight_decay"] == 1e-2
    assert len(_optimizer(net, TrainConfig.from_recipe("localise", attention_weight_decay=1e-2)).param_groups) == 1
    opt = _optimizer(net, TrainConfig.from_recipe("localise"))
    rest, own = opt.param_groups
    assert (rest["weight_decay"], own["weight_decay"]) == (1e-2, 0.0)
    assert {id(p) for p in own["params"]} == {id(net.encoder.w1.weight), id(net.encoder.w2.weight)}
    assert len(rest["params"]) + len(own["params"]) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="attention_weight_decay"):
        TrainConfig(attention_weight_decay=-1.0)
