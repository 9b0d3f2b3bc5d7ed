"""Reproduce the paper's synthetic experiments: saliency quality of plain and input-cell-attention
recurrent models on the six box datasets (PAPER.md, "The synthetic experiments").

For every (dataset, model, training setting): train with early stopping on a validation split
(never the test set), then on the test split report accuracy and how well gradient saliency of the
true class finds the informative box (weighted Jaccard, Euclidean, ROC-AUC, top-k Jaccard;
`training.evaluation`). For the models in `tsr_models`, Temporal Saliency Rescaling over gradients
is also scored, on the first `tsr_samples` test samples only (it costs 1 + T + kept * N gradient
passes per sample).

Training settings (`ReproConfig.recipes`): "paper" is the paper's (Adam, no weight decay, the
epoch caps `epochs` / `ica_epochs`); "localise" is `training.train`'s recipe of that name (Adam
with L2 weight decay, trained to a validation-loss plateau under the cap `localise_epochs`), run
for the models in `recipe_models`. So the report can put the two side by side: the issue-11
evidence is that the recipe, not the architecture alone, makes ICA saliency find the box. For
the models in `quality_models`, `explanation_quality` scores every saliency method the service
offers on the first `quality_samples` test samples, and the report checks issue 11's targets for
ICA-LSTM trained with the recipe.

Writes `<out>/reproduction.md` (tables, settings, machine, run time, the paper's claim checked
per dataset, recipe vs paper, per-method quality, the targets), `<out>/reproduction.json` (every
number) and PNG figures under `<out>/figures/`.

Jobs (one per dataset x model x recipe) run in `jobs` worker processes with one intra-op thread
each: the per-step GEMMs of a hidden-5 RNN are far too small to share between threads, and on a
busy machine extra threads mostly wait at OpenMP barriers.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Model keys, in report order, and the ModelConfig fields each sets.
MODELS: dict[str, dict[str, Any]] = {
    "lstm": {"cell": "lstm"},
    "bilstm": {"cell": "lstm", "bidirectional": True},
    "lstm_self": {"cell": "lstm", "attention": "self"},
    "ica_lstm": {"cell": "lstm", "attention": "ica", "ica_variant": "matrix"},
    "ica_lstm_mean": {"cell": "lstm", "attention": "ica", "ica_variant": "mean"},
    "gru": {"cell": "gru"},
    "ica_gru": {"cell": "gru", "attention": "ica", "ica_variant": "matrix"},
    "rnn": {"cell": "rnn"},
    "ica_rnn": {"cell": "rnn", "attention": "ica", "ica_variant": "matrix"},
}
# Plain model -> its input-cell-attention counterpart, for the claim check.
PAIRS = {"lstm": "ica_lstm", "gru": "ica_gru", "rnn": "ica_rnn"}
METRIC_LABELS = {
    "accuracy": "acc",
    "weighted_jaccard": "WJac ↑",
    "euclidean": "Euc ↓",
    "auc": "AUC ↑",
    "topk_jaccard": "top-k Jac ↑",
    "box_time_mass": "box-time mass ↑",
}
#: Training settings a reproduction can run: the paper's, and training.train's "localise" recipe.
REPRO_RECIPES = ("paper", "localise")
#: Issue 11's targets for ICA-LSTM trained with the recipe (checked by `targets_check`).
TARGET_ACCURACY = 0.98
TARGET_GRADIENT_AUC = 0.9
TARGET_GRADIENT_AUC_DATASETS = ("earlier_box", "middle_box", "latter_box", "three_earlier_boxes",
                                "three_middle_boxes")
TARGET_BEST_AUC = 0.8
TARGET_BEST_AUC_DATASETS = ("mixed_boxes",)
TARGET_BOX_TIME_RATIO = 2.0
ALL_DATASETS = ("earlier_box", "middle_box", "latter_box", "three_earlier_boxes", "three_middle_boxes",
                "mixed_boxes")
# Seconds per sample-gradient pass at T = N = 100 on one thread (training: forward + backward +
# optimizer step, batch 50; measured on the 2-core reference machine: a full-size ICA-LSTM epoch
# of 800 samples plus validation took ~1.2 s, an LSTM epoch ~0.15 s). Scheduling and the printed
# worst-case estimate only.
_PASS_SECONDS = {"ica": 1.2e-3, "plain": 0.18e-3}
# Gradient passes per sample of the gradient-family quality methods, at the service's defaults:
# gradient 1, input x gradient 1, integrated gradients 50 steps, SmoothGrad 20 samples.
_QUALITY_PASSES = 72
# Occlusion: a forward pass (~1/3 of a gradient pass) per window.
_OCCLUSION_PASS = 1 / 3


@dataclass
class ReproConfig:
    datasets: list[str] = field(default_factory=lambda: list(ALL_DATASETS))
    models: list[str] = field(default_factory=lambda: list(MODELS))
    n_train: int = 1000
    n_test: int = 300
    T: int = 100
    N: int = 100
    hidden: int = 5
    r: int = 20
    d_a: int = 50
    dropout: float = 0.1
    # Epoch caps. Plain models are cheap (~0.2 s an epoch at full size) and get many; an ICA
    # epoch costs ~10 s on one core (the (B, T, r, N) prefix sums), so they get a few: they reach
    # ~100% validation accuracy in 2-4 epochs, and their saliency scores barely move with longer
    # training (measured at T = N = 40: WJac 0.144 / 0.149 / 0.142 / 0.135 / 0.137 after
    # 5 / 10 / 20 / 40 / 80 epochs on the earlier box).
    epochs: int = 60
    ica_epochs: int = 6
    patience: int = 10  # early stopping: epochs without validation improvement
    batch_size: int = 50
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    tsr_models: list[str] = field(default_factory=lambda: ["lstm", "ica_lstm"])
    tsr_samples: int = 10
    # TSR costs 1 + T + kept * N gradient passes per sample (4601 at T = N = 100): ~60-200 s per
    # sample for an ICA model on one (shared) core, so by default only on the earlier box.
    tsr_datasets: list[str] | None = field(default_factory=lambda: ["earlier_box"])  # None: all
    saliency_batch: int = 50
    jobs: int = 2
    quick: bool = False
    # Training settings to run (REPRO_RECIPES); "localise" only for the models in recipe_models
    # (every model by default; at full size a capped ICA job costs ~6 min, see estimated_seconds).
    recipes: list[str] = field(default_factory=lambda: list(REPRO_RECIPES))
    recipe_models: list[str] = field(default_factory=lambda: list(MODELS))
    # Epoch cap of the "localise" recipe (its own default, 500, is for single models): it stops on
    # a validation-loss plateau first; at T = N = 40 that took ~180 epochs on the earlier box.
    localise_epochs: int = 300
    # Per-method explanation quality (training.evaluation.explanation_quality) on the first
    # quality_samples test samples (0: none), for these models, every recipe.
    quality_models: list[str] = field(default_factory=lambda: list(MODELS))
    quality_samples: int = 100
    # Occlusion (a forward pass per 5 x 5 window: 400 a sample at T = N = 100, ~100 s per 100
    # samples for the wide recipe ICA-LSTM) scores the first occlusion_samples of those.
    occlusion_samples: int = 50

    def __post_init__(self) -> None:
        from training.datasets import SYNTHETIC

        unknown = [d for d in self.datasets if d not in SYNTHETIC]
        if unknown or not self.datasets:
            raise ValueError(f"unknown dataset(s) {unknown}; choose from {', '.join(SYNTHETIC)}")
        bad = [m for m in [*self.models, *self.tsr_models, *self.recipe_models, *self.quality_models]
               if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
        bad = [r for r in self.recipes if r not in REPRO_RECIPES]
        if bad or not self.recipes:
            raise ValueError(f"unknown recipe(s) {bad}; choose from {', '.join(REPRO_RECIPES)}")
        if len(set(self.recipes)) != len(self.recipes):
            raise ValueError(f"recipes must not repeat, got {self.recipes}")
        if self.tsr_datasets is not None:
            bad = [d for d in self.tsr_datasets if d not in SYNTHETIC]
            if bad:
                raise ValueError(f"unknown TSR dataset(s) {bad}; choose from {', '.join(SYNTHETIC)}")
        for name in ("n_train", "n_test", "T", "N", "epochs", "ica_epochs", "patience", "batch_size", "jobs",
                     "saliency_batch", "localise_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("tsr_samples", "quality_samples", "occlusion_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.jobs_list():
            raise ValueError(f"nothing to run: recipes {self.recipes} with recipe_models {self.recipe_models} "
                             f"leave no job for models {self.models}")

    @classmethod
    def quick_mode(cls, **changes: Any) -> "ReproConfig":
        """One dataset, two models, both recipes, small sizes: a minute or two on two cores."""
        base = dict(datasets=["earlier_box"], models=["lstm", "ica_lstm"], n_train=400, n_test=100,
                    T=40, N=40, epochs=40, ica_epochs=12, patience=10, tsr_samples=4, tsr_datasets=None,
                    jobs=2, quick=True, recipes=list(REPRO_RECIPES), recipe_models=["lstm", "ica_lstm"],
                    localise_epochs=30, quality_models=["lstm", "ica_lstm"], quality_samples=20)
        return cls(**{**base, **changes})

    def model_config(self, key: str, recipe: str = "paper"):
        """The model of one job: the paper's sizes, with what the recipe brings to ICA models
        (training.train.RECIPE_ICA_MODEL: a wider cell for "localise")."""
        from training.models import ModelConfig
        from training.train import recipe_model

        sizes = {"hidden": self.hidden, **recipe_model(recipe, MODELS[key].get("attention", "none"))}
        return ModelConfig(n_features=self.N, n_classes=2, dropout=self.dropout, r=self.r, d_a=self.d_a,
                           **sizes, **MODELS[key])

    def epoch_cap(self, key: str, recipe: str = "paper") -> int:
        if recipe == "localise":
            return self.localise_epochs
        return self.ica_epochs if MODELS[key].get("attention") == "ica" else self.epochs

    def train_config(self, key: str, recipe: str = "paper"):
        """The TrainConfig of one job. "paper": exactly the settings before recipes existed (Adam, no
        weight decay, select on validation accuracy); "localise": the recipe, capped."""
        from training.train import TrainConfig

        common = dict(batch_size=self.batch_size, lr=self.lr, seed=self.seed, device="cpu", progress=False)
        if recipe == "localise":
            return TrainConfig.from_recipe("localise", epochs=self.localise_epochs, **common)
        return TrainConfig(epochs=self.epoch_cap(key), patience=self.patience, **common)

    def runs_tsr(self, dataset: str, model: str) -> bool:
        wanted = self.tsr_datasets is None or dataset in self.tsr_datasets
        return self.tsr_samples > 0 and model in self.tsr_models and wanted

    def runs_quality(self, model: str) -> bool:
        return self.quality_samples > 0 and model in self.quality_models

    def jobs_list(self) -> list["Job"]:
        """Every (dataset, model, recipe) to run, in report order: "paper" for every model,
        "localise" for those in recipe_models (so without "paper" only those run)."""
        triples = [(d, m, r) for d in self.datasets for m in self.models for r in self.recipes
                   if r == "paper" or m in self.recipe_models]
        return [Job(i, d, m, r) for i, (d, m, r) in enumerate(triples)]


@dataclass(frozen=True)
class Job:
    index: int
    dataset: str
    model: str
    recipe: str = "paper"


# -- one job (runs in a worker process) --------------------------------------------------------
_QUEUE: Any = None


def _init_worker(q: Any) -> None:
    import torch

    global _QUEUE
    _QUEUE = q
    torch.set_num_threads(1)


def _send(job: Job, **info: Any) -> None:
    if _QUEUE is not None:
        _QUEUE.put((job.index, info))


@lru_cache(maxsize=2)
def _data(name: str, n_train: int, n_test: int, T: int, N: int, seed: int, val_fraction: float):
    from training.datasets import synthetic_splits, train_val_split

    train_ds, test_ds = synthetic_splits(name, n_train, n_test, T, N, seed)
    fit_ds, val_ds = train_val_split(train_ds, val_fraction, seed)
    return fit_ds, val_ds, test_ds


@contextlib.contextmanager
def _epoch_reports(callback: Callable[[int], None]):
    """Per-epoch progress out of `training.train.train`, which has no callback of its own: it
    evaluates the validation split exactly once per epoch through the module-level
    `evaluate_loss_acc`, so count those calls (then three more for the final metrics)."""
    import training.train as tt

    original = tt.evaluate_loss_acc
    calls = 0

    def counting(*args: Any, **kwargs: Any):
        nonlocal calls
        out = original(*args, **kwargs)
        calls += 1
        callback(calls)
        return out

    tt.evaluate_loss_acc = counting
    try:
        yield
    finally:
        tt.evaluate_loss_acc = original


def run_job(job: Job, cfg: ReproConfig) -> dict[str, Any]:
    """Train one model on one dataset with one recipe and score its saliency; returns plain data."""
    from training.evaluation import (
        DEFAULT_PARAMS,
        QUALITY_METHODS,
        accuracy,
        compute_saliency,
        explanation_quality,
        score_saliency,
        time_profile,
    )
    from training.models import inference_copy
    from training.train import train

    fit_ds, val_ds, test_ds = _data(job.dataset, cfg.n_train, cfg.n_test, cfg.T, cfg.N, cfg.seed,
                                    cfg.val_fraction)
    mc = cfg.model_config(job.model, job.recipe)
    cap = cfg.epoch_cap(job.model, job.recipe)
    tc = cfg.train_config(job.model, job.recipe)
    _send(job, stage="training", epoch=0, cap=cap)
    with _epoch_reports(lambda n: _send(job, stage="training", epoch=min(n, cap), cap=cap)):
        result = train(mc, fit_ds, val_ds, tc, test_ds, description=f"{mc.label} on {job.dataset} ({job.recipe})")
    model = inference_copy(result.model)
    X = result.standardizer.apply(test_ds.X)
    y, masks = test_ds.y, test_ds.masks

    _send(job, stage="gradient saliency")
    t0 = time.perf_counter()
    grad = compute_saliency(model, X, y, "gradient", cfg.saliency_batch)
    record: dict[str, Any] = {
        "dataset": job.dataset,
        "model": job.model,
        "recipe": job.recipe,
        "label": mc.label,
        "test_accuracy": result.metrics["test"]["accuracy"],
        "val_accuracy": result.metrics["validation"]["accuracy"],
        "train_accuracy": result.metrics["train"]["accuracy"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "epoch_cap": cap,
        "stopped": result.stopped,
        "training": {k: getattr(tc, k) for k in ("optimizer", "weight_decay", "select", "patience", "min_delta",
                                                 "epochs", "lr", "batch_size", "recipe")},
        "train_seconds": result.seconds,
        "gradient": {"accuracy": result.metrics["test"]["accuracy"], **score_saliency(grad, masks)},
        "profile": time_profile(grad).tolist(),
        "truth_profile": time_profile(masks).tolist(),
        "box_time_share": float(masks.any(axis=2).mean()),  # box-time mass of uniform saliency
        "example": {"index": 0, "saliency": grad[0].astype(np.float32), "mask": masks[0],
                    "label": int(y[0])},
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    record["gradient_seconds"] = time.perf_counter() - t0
    tsr_saliency = None
    if cfg.runs_tsr(job.dataset, job.model):
        n = min(cfg.tsr_samples, len(X))
        _send(job, stage=f"TSR ({n} samples)")
        t0 = time.perf_counter()
        # The service's TSR parameters, so the quality record below can reuse these maps.
        tsr_saliency = compute_saliency(model, X[:n], y[:n], "tsr", batch=1, chunk_size=100,
                                        **DEFAULT_PARAMS["tsr"])
        record["tsr"] = {"accuracy": accuracy(model, X[:n], y[:n]), **score_saliency(tsr_saliency, masks[:n])}
        # Gradient saliency scored on the same samples, for a like-for-like comparison.
        record["gradient_on_tsr_subset"] = {"accuracy": record["tsr"]["accuracy"],
                                            **score_saliency(grad[:n], masks[:n])}
        record["tsr_example"] = tsr_saliency[0].astype(np.float32)
        record["tsr_seconds"] = time.perf_counter() - t0
    if cfg.runs_quality(job.model):
        n = min(cfg.quality_samples, len(X))
        _send(job, stage=f"explanation quality ({n} samples)")
        t0 = time.perf_counter()
        methods = tuple(m for m in QUALITY_METHODS if m != "tsr")
        quality = explanation_quality(model, X[:n], y[:n], masks[:n], dataset=job.dataset, seed=cfg.seed,
                                      methods=methods, occlusion_samples=cfg.occlusion_samples,
                                      batch=cfg.saliency_batch)
        if tsr_saliency is not None and "tsr" in QUALITY_METHODS:
            # TSR is hundreds of passes a sample: score the maps computed above (the first
            # min(tsr_samples, n) samples) instead of computing them twice.
            k = min(len(tsr_saliency), n)
            scores = score_saliency(tsr_saliency[:k], masks[:k])
            quality["methods"]["tsr"] = {m: (None if math.isnan(v) else float(v))
                                         for m, v in scores.items() if m != "n"}
            quality["methods"]["tsr"]["n"] = int(k)
            quality["parameters"]["tsr"] = dict(DEFAULT_PARAMS["tsr"])
        record["quality"] = quality
        record["quality_seconds"] = time.perf_counter() - t0
    _send(job, stage="done")
    return record


# -- the whole run -----------------------------------------------------------------------------
def run_reproduction(cfg: ReproConfig, out: str | Path, *, progress: bool = True,
                     command: str | None = None) -> dict[str, Any]:
    """Run every job, write the report, the JSON and the figures under `out`; returns the JSON."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out)
    start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    jobs = cfg.jobs_list()
    labels = {k: cfg.model_config(k).label for k in MODELS}
    records: dict[int, dict[str, Any]] = {}
    columns = [TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with Progress(*columns, disable=not progress, refresh_per_second=2) as bar, \
            ProcessPoolExecutor(max_workers=min(cfg.jobs, len(jobs)), mp_context=ctx,
                                initializer=_init_worker, initargs=(q,)) as pool:
        overall = bar.add_task("[bold]reproduction[/] (dataset x model x recipe)", total=len(jobs), info="")
        rows: dict[int, Any] = {}
        # Longest first, so the two workers finish together.
        order = sorted(jobs, key=lambda j: -estimated_cost(cfg, j))
        futures: dict[Future, Job] = {pool.submit(run_job, job, cfg): job for job in order}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(q, bar, rows, jobs, labels, cfg)
            for fut in done:
                job = futures[fut]
                rec = fut.result()  # a failed job fails the run, loudly
                records[job.index] = rec
                if job.index in rows:
                    bar.remove_task(rows.pop(job.index))
                bar.advance(overall)
                g = rec["gradient"]
                bar.console.log(
                    f"{job.dataset:<20} {rec['label']:<22} {job.recipe:<8} acc {rec['test_accuracy']:.3f}  "
                    f"WJac {g['weighted_jaccard']:.3f}  AUC {g['auc']:.3f}  "
                    f"(epochs {rec['epochs_run']}, {rec['train_seconds']:.0f} s)"
                )
        _drain(q, bar, rows, jobs, labels, cfg)
    ordered = [records[j.index] for j in jobs]
    seconds = time.perf_counter() - start
    result = {
        "settings": asdict(cfg),
        "machine": machine_info(cfg.jobs),
        "started_at": started_at.isoformat(timespec="seconds"),
        "seconds": seconds,
        "command": command,
        "estimated_seconds": estimated_seconds(cfg),
        "references": {d: reference_scores(cfg, d) for d in cfg.datasets},
        "results": [_jsonable(r) for r in ordered],
        "targets": targets_check(ordered),
    }
    write_outputs(result, ordered, cfg, out)
    return result


def reference_scores(cfg: ReproConfig, dataset: str) -> dict[str, float]:
    """What explains nothing scores: i.i.d. uniform random saliency on the same test masks.
    WJac and Euc depend on how much mass a map spreads outside the box, so a diffuse map scores
    a clearly non-zero WJac without pointing at the box; this row says how much."""
    from training.evaluation import score_saliency

    _, _, test_ds = _data(dataset, cfg.n_train, cfg.n_test, cfg.T, cfg.N, cfg.seed, cfg.val_fraction)
    rng = np.random.default_rng(cfg.seed)
    return score_saliency(rng.random(test_ds.masks.shape), test_ds.masks)


def estimated_cost(cfg: ReproConfig, job: Job) -> float:
    """Worst-case seconds of a job on one thread of the reference machine, for scheduling and the
    printed estimate: sample-gradient passes times the cost of a pass, which grows with T x N (an
    ICA model's pass costs ~7 plain ones: its prefix sums). Training counts its epoch cap, which a
    "localise" job may reach (it stops earlier on a plateau), quality its methods' passes."""
    from attribution.occlusion import resolve_window, window_starts

    kind = "ica" if MODELS[job.model].get("attention") == "ica" else "plain"
    unit = _PASS_SECONDS[kind] * cfg.T * cfg.N / 1e4
    passes = cfg.epoch_cap(job.model, job.recipe) * cfg.n_train + cfg.n_test
    if cfg.runs_tsr(job.dataset, job.model):
        passes += cfg.tsr_samples * (1 + cfg.T + 0.45 * cfg.T * cfg.N)
    if cfg.runs_quality(job.model):
        passes += min(cfg.quality_samples, cfg.n_test) * _QUALITY_PASSES
        (wt, wn), (st, sn) = resolve_window(cfg.T, cfg.N)  # occlusion's default windows
        windows = len(window_starts(cfg.T, wt, st)) * len(window_starts(cfg.N, wn, sn))
        passes += min(cfg.occlusion_samples, cfg.quality_samples, cfg.n_test) * windows * _OCCLUSION_PASS
    return unit * passes


def estimated_seconds(cfg: ReproConfig) -> float:
    """Worst-case wall time of the whole run (every job to its epoch cap) on `jobs` idle cores:
    the longest-first schedule run_reproduction uses, on the reference machine's speed."""
    load = [0.0] * cfg.jobs
    for cost in sorted((estimated_cost(cfg, j) for j in cfg.jobs_list()), reverse=True):
        load[load.index(min(load))] += cost
    return max(load)


def _drain(q: Any, bar: Any, rows: dict[int, Any], jobs: list[Job], labels: dict[str, str],
           cfg: ReproConfig) -> None:
    while True:
        try:
            index, info = q.get_nowait()
        except queue_mod.Empty:
            return
        job = jobs[index]
        if info.get("stage") == "done":
            continue
        name = f"  {job.dataset} · {labels[job.model]} · {job.recipe}"
        if index not in rows:
            rows[index] = bar.add_task(name, total=info.get("cap", 1), info="")
        if "epoch" in info:
            bar.update(rows[index], completed=info["epoch"], info=f"epoch {info['epoch']}/{info['cap']}")
        else:
            bar.update(rows[index], info=info["stage"])


def machine_info(jobs: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(v, 2) for v in os.getloadavg()]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "worker_processes": jobs,
        "threads_per_worker": 1,
        "load_average_at_end": load,
    }


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("example", "tsr_example")}


# -- report ------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    """A finite float, or None (a NaN score is "not measured", never a value to compare)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _fmt(v: Any, digits: int = 3) -> str:
    v = _num(v)
    return "–" if v is None else f"{v:.{digits}f}"


def recipe_of(record: dict[str, Any]) -> str:
    """A record's training setting; records written before recipes existed are "paper"."""
    return record.get("recipe", "paper")


def paper_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if recipe_of(r) == "paper"]


def best_method(record: dict[str, Any]) -> dict[str, Any] | None:
    """The saliency method with the highest ROC-AUC in the record's per-method quality (else the
    gradient on the whole test set): {"method", "auc", "box_time_mass", "chance_box_time", "n"};
    None when no AUC was measured. Chance is the box's share of time steps on the same samples."""
    quality = record.get("quality")
    if quality:
        scored = [(name, m) for name, m in quality["methods"].items() if _num(m.get("auc")) is not None]
        if scored:
            name, m = max(scored, key=lambda item: item[1]["auc"])
            chance = _num((quality.get("chance") or {}).get("box_time_mass"))
            return {"method": name, "auc": float(m["auc"]), "box_time_mass": _num(m.get("box_time_mass")),
                    "n": m.get("n"), "chance_box_time": chance if chance is not None else record.get("box_time_share")}
    g = record["gradient"]
    if _num(g.get("auc")) is None:
        return None
    n = g.get("n")
    return {"method": "gradient", "auc": float(g["auc"]), "box_time_mass": _num(g.get("box_time_mass")),
            "n": None if n is None else int(n), "chance_box_time": record.get("box_time_share")}


def targets_check(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's targets for ICA-LSTM trained with the "localise" recipe, from the records:

    1. test accuracy >= TARGET_ACCURACY on every dataset;
    2. gradient ROC-AUC (whole test set) >= TARGET_GRADIENT_AUC on the single and three-box sets;
    3. ROC-AUC >= TARGET_BEST_AUC with the best method (best_method) on mixed boxes;
    4. the best method's box-time share >= TARGET_BOX_TIME_RATIO x chance on every dataset.

    Each: {"target", "status" ("met", "met (partial)": met on every dataset run but some were not
    run, "NOT met", "not measured"), "values": [{"dataset", "value", "needed", "met", "method"}],
    "missing": datasets not run}. Where 2 x chance exceeds 1 (a box over half the steps) target 4
    cannot be met there; the value says so rather than the check bending."""
    ica = {r["dataset"]: r for r in records if r["model"] == "ica_lstm" and recipe_of(r) == "localise"}

    def accuracy(r: dict[str, Any]) -> tuple[float | None, float, str | None]:
        return _num(r["test_accuracy"]), TARGET_ACCURACY, None

    def gradient_auc(r: dict[str, Any]) -> tuple[float | None, float, str | None]:
        return _num(r["gradient"].get("auc")), TARGET_GRADIENT_AUC, "gradient"

    def best_auc(r: dict[str, Any]) -> tuple[float | None, float, str | None]:
        b = best_method(r)
        return (b["auc"], TARGET_BEST_AUC, b["method"]) if b else (None, TARGET_BEST_AUC, None)

    def box_time(r: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
        b = best_method(r)
        if b is None or b["chance_box_time"] is None:
            return None, None, None
        return b["box_time_mass"], TARGET_BOX_TIME_RATIO * b["chance_box_time"], b["method"]

    specs = (
        (f"test accuracy >= {TARGET_ACCURACY} on every dataset", ALL_DATASETS, accuracy),
        (f"gradient AUC >= {TARGET_GRADIENT_AUC} on earlier, middle, latter, 3 earlier and 3 middle boxes",
         TARGET_GRADIENT_AUC_DATASETS, gradient_auc),
        (f"AUC >= {TARGET_BEST_AUC} with the best method on mixed boxes", TARGET_BEST_AUC_DATASETS, best_auc),
        (f"the best method's box-time share >= {TARGET_BOX_TIME_RATIO:g} x chance on every dataset",
         ALL_DATASETS, box_time),
    )
    out = []
    for text, wanted, measure in specs:
        values = []
        for d in wanted:
            if d not in ica:
                continue
            value, needed, method = measure(ica[d])
            met = value is not None and needed is not None and value >= needed
            values.append({"dataset": d, "value": value, "needed": needed, "met": met, "method": method})
        missing = [d for d in wanted if d not in ica]
        if not values:
            status = "not measured"
        elif not all(v["met"] for v in values):
            status = "NOT met"
        else:
            status = "met (partial)" if missing else "met"
        out.append({"target": text, "status": status, "values": values, "missing": missing})
    return out


def render_targets(targets: list[dict[str, Any]]) -> list[str]:
    """The targets checklist as Markdown lines (also what `icaserve reproduce` prints)."""
    lines = []
    for t in targets:
        parts = []
        for v in t["values"]:
            text = f"{v['dataset']} {_fmt(v['value'])}"
            if "best" in t["target"]:
                text += f" ({v['method'] or 'no method'})"
            if "chance" in t["target"] and v["needed"] is not None:
                text += f" vs {_fmt(v['needed'])}" + (" (above 1: cannot be met)" if v["needed"] > 1 else "")
            parts.append(text + ("" if v["met"] else " ✗"))
        if t["missing"]:
            parts.append("not run: " + ", ".join(t["missing"]))
        box = "x" if t["status"].startswith("met") else " "
        lines.append(f"- [{box}] {t['target']}: **{t['status']}**" + (" — " + "; ".join(parts) if parts else ""))
    return lines


def claim_check(records: list[dict[str, Any]], acc_threshold: float = 0.95) -> list[dict[str, Any]]:
    """Per dataset and plain/ICA pair present, trained the paper's way: does the ICA model reach
    high accuracy with a weighted Jaccard clearly (> 0.05 absolute) above the plain model's?"""
    records = paper_rows(records)
    by = {(r["dataset"], r["model"]): r for r in records}
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for plain, ica in PAIRS.items():
            if (dataset, plain) not in by or (dataset, ica) not in by:
                continue
            p, c = by[(dataset, plain)], by[(dataset, ica)]
            wp, wc = p["gradient"]["weighted_jaccard"], c["gradient"]["weighted_jaccard"]
            rows.append({
                "dataset": dataset, "plain": p["label"], "ica": c["label"],
                "plain_acc": p["test_accuracy"], "ica_acc": c["test_accuracy"],
                "plain_wjac": wp, "ica_wjac": wc,
                "plain_auc": p["gradient"]["auc"], "ica_auc": c["gradient"]["auc"],
                "holds": c["test_accuracy"] >= acc_threshold and wc > wp + 0.05,
            })
    return rows


def render_markdown(result: dict[str, Any], records: list[dict[str, Any]], cfg: ReproConfig) -> str:
    m = result["machine"]
    refs = result.get("references", {})
    ref_label = "*i.i.d. uniform random saliency (reference)*"
    minutes = result["seconds"] / 60
    all_records = records
    datasets = list(dict.fromkeys(r["dataset"] for r in all_records))
    label = {r["model"]: r["label"] for r in all_records}
    # The sections up to the TSR table are the paper's settings only, as before recipes existed.
    records = paper_rows(all_records)
    models = list(dict.fromkeys(r["model"] for r in records))
    by = {(r["dataset"], r["model"]): r for r in records}
    lines = [
        "# Reproduction: saliency of plain and input-cell-attention RNNs on the box datasets",
        "",
        "Paper: Ismail et al., *Input-Cell Attention Reduces Vanishing Saliency of Recurrent Neural "
        "Networks*, NeurIPS 2019 (see `shared/PAPER.md`). Generated by `training/reproduce.py`"
        + (" in **quick mode** (small sizes, not the paper's settings)" if cfg.quick else "") + ".",
        "",
        f"- command: `{result.get('command') or 'icaserve reproduce'}`",
        f"- started {result['started_at']}, wall time **{minutes:.1f} min** ({result['seconds']:.0f} s)",
        f"- machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Python {m['python']}, "
        f"numpy {m['numpy']}; {m['worker_processes']} worker processes x {m['threads_per_worker']} "
        f"thread; load average at the end {m['load_average_at_end']} (the machine was shared)",
        "",
        "## Settings",
        "",
        f"- data: {cfg.n_train} training samples (of which {cfg.val_fraction:.0%} held out for model "
        f"selection), {cfg.n_test} test samples, T = {cfg.T} time steps x N = {cfg.N} features, "
        f"seed {cfg.seed}; inputs standardised with training statistics",
        f"- models: hidden {cfg.hidden}, one layer, dropout {cfg.dropout} on input and output; "
        f"attention r = {cfg.r}, d_a = {cfg.d_a} (ICA and self-attention)",
        f"- training: Adam lr {cfg.lr}, batch {cfg.batch_size}, cross-entropy on logits, at most "
        f"{cfg.epochs} epochs for plain models and {cfg.ica_epochs} for ICA models, early stopping after {cfg.patience} epochs without validation "
        "improvement, best validation epoch kept (the test set is never used for selection)",
        "- saliency: gradient of the true class's logit w.r.t. the standardised input, |.|, "
        "min-max scaled per sample over T x N; scored against the box mask on the whole test set",
    ]
    if "localise" in cfg.recipes:
        from training.train import RECIPES, recipe_model

        rc = RECIPES["localise"]
        lines.append(
            f"- recipe `localise` (training.train, issue 11) for {', '.join(label.get(k, k) for k in cfg.recipe_models if k in cfg.models)}: "
            f"{rc['optimizer'].capitalize()} with L2 weight decay {rc['weight_decay']:g}"
            + (f" ({rc['attention_weight_decay']:g} on the ICA attention's own weights)"
               if rc.get("attention_weight_decay") is not None else "")
            + "".join(f", {k} {v} for ICA models" for k, v in recipe_model("localise", "ica").items())
            + ", same lr, batch and seed, "
            f"improvement = validation loss lower by > {rc['min_delta']:g}, stop after {rc['patience']} epochs "
            f"without one, at most {cfg.localise_epochs} epochs (the recipe's own cap is {rc['epochs']}), "
            "best epoch kept")
    if cfg.quality_samples and cfg.quality_models:
        lines.append(
            f"- per-method quality (`explanation_quality`, the service's default parameters) for "
            f"{', '.join(label.get(k, k) for k in cfg.quality_models if k in cfg.models)}: gradient, input x gradient, "
            f"integrated gradients, SmoothGrad on the first {cfg.quality_samples} test samples; occlusion (5 x 5 "
            f"windows) on the first {min(cfg.occlusion_samples, cfg.quality_samples)}; TSR where it "
            f"runs (below) on the first {min(cfg.tsr_samples, cfg.quality_samples)}")
    if cfg.tsr_samples and cfg.tsr_models:
        where = "every dataset" if cfg.tsr_datasets is None else ", ".join(cfg.tsr_datasets)
        lines.append(
            f"- TSR (gradient base, threshold quantile 0.55, feature default 0.1, zero baseline) for "
            f"{', '.join(label.get(k, k) for k in cfg.tsr_models)} on {where}: **only the first "
            f"{cfg.tsr_samples} test samples** (each costs 1 + T + kept x N gradient passes); the "
            "gradient scores on the same samples are given beside it")
    if max(cfg.epochs, cfg.ica_epochs) < 400:
        lines.append(
            f"- deviation from the authors' code: they train up to 400 epochs; here at most {cfg.epochs} "
            f"(plain) and {cfg.ica_epochs} (ICA)"
            + (f", {cfg.localise_epochs} with the recipe" if "localise" in cfg.recipes else "")
            + " so that the whole run fits in an hour on two cores "
            "(the epochs column shows where each stopped and which epoch was kept)")
    lines += ["", "## The paper's claim, checked", "",
              "As stated: input-cell attention reaches high accuracy (>= 95% here) and a weighted Jaccard "
              "clearly above the plain model's (by > 0.05). The last columns ask the stronger question the "
              "paper's figures suggest: does the ICA saliency point at the box (AUC of the saliency as a "
              "box detector clearly above 0.5, here >= 0.6)?", "",
              "| dataset | plain | acc | WJac | AUC | ICA | acc | WJac | AUC | claim holds | box found (AUC >= 0.6) | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in claim_check(records):
        note = "plain model near chance: its saliency explains little" if c["plain_acc"] < 0.9 else ""
        lines.append(f"| {c['dataset']} | {c['plain']} | {_fmt(c['plain_acc'])} | {_fmt(c['plain_wjac'])} | "
                     f"{_fmt(c['plain_auc'])} | {c['ica']} | {_fmt(c['ica_acc'])} | {_fmt(c['ica_wjac'])} | "
                     f"{_fmt(c['ica_auc'])} | {'yes' if c['holds'] else '**no**'} | "
                     f"{'yes' if c['ica_auc'] >= 0.6 else 'no'} | {note} |")

    for title, key in (("Test accuracy", "accuracy"), ("Weighted Jaccard (gradient saliency) ↑", "weighted_jaccard"),
                       ("ROC-AUC of saliency vs. box ↑", "auc"),
                       ("Share of saliency mass on the box's time steps ↑", "box_time_mass")):
        lines += ["", f"## {title}", "", "| model | " + " | ".join(datasets) + " |",
                  "|---" * (len(datasets) + 1) + "|"]
        for mk in models:
            cells = [_fmt(by[(d, mk)]["gradient"][key]) if (d, mk) in by else "–" for d in datasets]
            lines.append(f"| {label[mk]} | " + " | ".join(cells) + " |")
        if key == "box_time_mass":
            first = {d: next(r for r in all_records if r["dataset"] == d) for d in datasets}
            lines.append("| *uniform saliency (chance)* | "
                         + " | ".join(_fmt(first[d]["box_time_share"]) for d in datasets) + " |")
            lines += ["", "Not one of the paper's metrics: the time-only form of its claim (where along the "
                      "sequence does the saliency put the evidence?). ~0 means the saliency vanished before "
                      "reaching the box; the chance row is what saliency spread evenly over time would score."]
        if key in ("weighted_jaccard", "auc") and refs:
            lines.append(f"| {ref_label} | " + " | ".join(_fmt(refs[d][key]) if d in refs else "–"
                                                          for d in datasets) + " |")
        if key == "weighted_jaccard" and refs:
            lines += ["", "WJac rewards any map that spreads mass over the box, focused or not: the reference "
                      "row is a map of pure noise. A model's WJac means something where it beats that row "
                      "and its AUC is clearly above 0.5."]
        if key == "auc":
            lines += ["", "0.5 = no better than chance at telling box cells from background; below 0.5 = "
                      "the saliency sits outside the box."]

    lines += ["", "## All results (gradient saliency, whole test set)", ""]
    head = ["dataset", "model", *METRIC_LABELS.values(), "epochs (best/run)", "train s"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for i, r in enumerate(records):
        g = r["gradient"]
        lines.append(
            f"| {r['dataset']} | {r['label']} | " + " | ".join(_fmt(g[k]) for k in METRIC_LABELS)
            + f" | {r['best_epoch']}/{r['epochs_run']} | {r['train_seconds']:.0f} |")
        last_of_dataset = i + 1 == len(records) or records[i + 1]["dataset"] != r["dataset"]
        if last_of_dataset and r["dataset"] in refs:
            ref = refs[r["dataset"]]
            lines.append(f"| {r['dataset']} | {ref_label} | – | "
                         + " | ".join(_fmt(ref[k]) for k in list(METRIC_LABELS)[1:]) + " | | |")

    tsr_rows = [r for r in records if "tsr" in r]
    if tsr_rows:
        lines += ["", f"## TSR over gradient (first {cfg.tsr_samples} test samples)", ""]
        head = ["dataset", "model", "saliency", *METRIC_LABELS.values(), "seconds"]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in tsr_rows:
            for name, key, secs in (("gradient", "gradient_on_tsr_subset", None), ("TSR", "tsr", r["tsr_seconds"])):
                s = r[key]
                lines.append(f"| {r['dataset']} | {r['label']} | {name} | "
                             + " | ".join(_fmt(s[k]) for k in METRIC_LABELS)
                             + f" | {'' if secs is None else f'{secs:.0f}'} |")

    lines += render_recipe_sections(all_records, cfg)

    lines += ["", "## Figures", ""]
    for d in datasets:
        lines += [f"- {d}: [saliency maps](figures/{d}_saliency.png), "
                  f"[saliency mass per time step](figures/{d}_time_profile.png)"]
    lines += ["- all datasets: [saliency mass per time step](figures/time_profiles.png)", "",
              "![time profiles](figures/time_profiles.png)", ""]
    if _recipe_pairs(all_records):
        lines += ["- true box beside ICA-LSTM saliency, paper's settings and recipe: "
                  "[figures/recipe_saliency.png](figures/recipe_saliency.png)", "",
                  "![ICA-LSTM: paper's settings vs recipe](figures/recipe_saliency.png)", ""]
    lines += [f"Raw numbers: `reproduction.json`. Total wall time {minutes:.1f} min.", ""]
    return "\n".join(lines)


def render_recipe_sections(records: list[dict[str, Any]], cfg: ReproConfig) -> list[str]:
    """The recipe sections: recipe vs the paper's settings, quality per method, the targets."""
    lines: list[str] = []
    recipes = list(dict.fromkeys(recipe_of(r) for r in records))
    if "localise" in recipes:
        lines += ["", "## Training recipe vs the paper's settings", "",
                  "Each model as the paper trains it (`paper`) and with the issue-11 recipe (`localise`: L2 "
                  "weight decay, trained to a validation-loss plateau). Best method: the highest ROC-AUC of the "
                  "per-method scores below (else the gradient on the whole test set); its box-time share beside "
                  "the chance level (the box's share of time steps, what an even spread scores).", "",
                  "| dataset | model | recipe | acc | epochs (best/run, cap) | stopped | gradient AUC | best method "
                  "(samples) | its AUC | its box-time share | chance |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            b = best_method(r)
            best = f"{b['method']} ({b['n']})" if b else "–"
            lines.append(
                f"| {r['dataset']} | {r['label']} | {recipe_of(r)} | {_fmt(r['test_accuracy'])} | "
                f"{r['best_epoch']}/{r['epochs_run']}, {r.get('epoch_cap', '–')} | {r.get('stopped', '–')} | "
                f"{_fmt(r['gradient']['auc'])} | {best} | {_fmt(b['auc']) if b else '–'} | "
                f"{_fmt(b['box_time_mass']) if b else '–'} | {_fmt(b['chance_box_time']) if b else '–'} |")

    with_quality = [r for r in records if r.get("quality")]
    if with_quality:
        methods = list(dict.fromkeys(m for r in with_quality for m in r["quality"]["methods"]))
        lines += ["", "## Explanation quality per method (AUC / box-time share)", "",
                  f"`explanation_quality` with the service's default parameters on the first "
                  f"{cfg.quality_samples} test samples (occlusion on the first "
                  f"{min(cfg.occlusion_samples, cfg.quality_samples)}, TSR on the first "
                  f"{min(cfg.tsr_samples, cfg.quality_samples)}, where it runs); chance: AUC 0.5, box-time share as in the last column.", "",
                  "| dataset | model | recipe | acc | " + " | ".join(methods) + " | chance box-time |",
                  "|---" * (len(methods) + 5) + "|"]
        for r in with_quality:
            q = r["quality"]
            cells = []
            for name in methods:
                s = q["methods"].get(name)
                cells.append("–" if s is None else f"{_fmt(s.get('auc'))} / {_fmt(s.get('box_time_mass'), 2)}")
            chance = (q.get("chance") or {}).get("box_time_mass")
            lines.append(f"| {r['dataset']} | {r['label']} | {recipe_of(r)} | {_fmt(q['accuracy'])} | "
                         + " | ".join(cells) + f" | {_fmt(chance, 2)} |")

    if "localise" in recipes or any(r["model"] == "ica_lstm" for r in records):
        lines += ["", "## Targets (ICA-LSTM, recipe)", "",
                  "Issue 11's targets, each measured on ICA-LSTM (matrix) trained with `localise`; ✗ marks a "
                  "dataset that misses its target.", ""]
        lines += render_targets(targets_check(records))
    return lines


# -- figures -----------------------------------------------------------------------------------
def write_figures(records: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from training.evaluation import minmax_scale

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    for d in datasets:
        recs = [r for r in records if r["dataset"] == d]
        ex = recs[0]["example"]
        panels = [("ground truth (box)", ex["mask"].astype(float))]
        for r in recs:
            name = record_label(r)
            panels.append((f"{name}\nacc {r['test_accuracy']:.2f}", minmax_scale(r["example"]["saliency"][None])[0]))
            if "tsr_example" in r:
                panels.append((f"{name} + TSR", minmax_scale(r["tsr_example"][None])[0]))
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (title, img) in zip(axes.flat, panels):
            ax.axis("on")
            ax.imshow(img.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("time step", fontsize=7)
            ax.set_ylabel("feature", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.suptitle(f"{d}: |gradient| of the true class, test sample 0 (label {ex['label']}), min-max scaled",
                     fontsize=9)
        fig.tight_layout()
        path = fig_dir / f"{d}_saliency.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(7, 3.6))
        _plot_profiles(ax, recs, plt)
        ax.set_title(f"{d}: share of saliency mass per time step (test mean)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = fig_dir / f"{d}_time_profile.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    cols = min(3, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5 * cols, 8), 3.3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, d in zip(axes.flat, datasets):
        ax.axis("on")
        # Every paper-settings model, and of the recipe runs ICA-LSTM only (the targets' model).
        _plot_profiles(ax, [r for r in records if r["dataset"] == d
                            and (recipe_of(r) == "paper" or r["model"] == "ica_lstm")], plt)
        ax.set_title(d, fontsize=9)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7)
    fig.suptitle("Share of gradient-saliency mass per time step (test mean); grey: ground truth", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    path = fig_dir / "time_profiles.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    pairs = _recipe_pairs(records)
    if pairs:
        written.append(_recipe_figure(pairs, fig_dir, plt, minmax_scale))
    return written


def record_label(record: dict[str, Any]) -> str:
    """The model's label, with the recipe where it is not the paper's."""
    return record["label"] + (" · localise" if recipe_of(record) == "localise" else "")


def _recipe_pairs(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
    """(dataset, ICA-LSTM paper record or None, ICA-LSTM localise record) per dataset run with both."""
    ica = {(r["dataset"], recipe_of(r)): r for r in records if r["model"] == "ica_lstm"}
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    return [(d, ica.get((d, "paper")), ica[(d, "localise")]) for d in datasets if (d, "localise") in ica]


def _recipe_figure(pairs: list[tuple[str, Any, Any]], fig_dir: Path, plt: Any, minmax_scale: Any) -> Path:
    """One row per dataset: the true box of test sample 0 beside ICA-LSTM's |gradient| of that
    sample trained the paper's way and with the recipe."""
    fig, axes = plt.subplots(len(pairs), 3, figsize=(9.6, 2.6 * len(pairs)), squeeze=False)
    for row, (d, paper, local) in zip(axes, pairs):
        ex = local["example"]
        panels = [(f"{d}: true box (label {ex['label']})", ex["mask"].astype(float))]
        for rec, name in ((paper, "paper's settings"), (local, "recipe (localise)")):
            if rec is None:
                panels.append((f"ICA-LSTM, {name}: not run", None))
            else:
                panels.append((f"ICA-LSTM, {name}\nacc {rec['test_accuracy']:.2f}, gradient AUC "
                               f"{_fmt(rec['gradient']['auc'], 2)}", minmax_scale(rec["example"]["saliency"][None])[0]))
        for ax, (title, img) in zip(row, panels):
            ax.set_title(title, fontsize=8)
            if img is None:
                ax.axis("off")
                continue
            ax.imshow(img.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xlabel("time step", fontsize=7)
            ax.set_ylabel("feature", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle("|gradient| of the true class, test sample 0, min-max scaled", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path = fig_dir / "recipe_saliency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_profiles(ax: Any, recs: list[dict[str, Any]], plt: Any) -> None:
    # Log scale: vanishing saliency decays geometrically from the last step backwards, and the
    # end spikes of the plain models would otherwise flatten every other curve.
    floor = 1e-5
    truth = np.asarray(recs[0]["truth_profile"])
    steps = np.arange(len(truth))
    ax.fill_between(steps, floor, np.maximum(truth, floor), color="0.85", label="ground truth", step="mid")
    cmap = plt.get_cmap("tab10")
    order = list(MODELS)
    for r in recs:
        # One colour per model; the recipe's curve dash-dotted and thicker beside the paper's.
        local = recipe_of(r) == "localise"
        style = "-." if local else ("-" if r["model"].startswith("ica") else "--")
        ax.plot(steps, np.maximum(r["profile"], floor), style, color=cmap(order.index(r["model"]) % 10),
                lw=1.8 if local else 1.2, label=record_label(r))
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.0)
    ax.set_xlabel("time step", fontsize=7)
    ax.set_ylabel("share of saliency (log)", fontsize=7)
    ax.tick_params(labelsize=6)


def write_outputs(result: dict[str, Any], records: list[dict[str, Any]], cfg: ReproConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_figures(records, out)
    (out / "reproduction.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "reproduction.md").write_text(render_markdown(result, records, cfg))


def main_table(result: dict[str, Any]) -> list[tuple[str, str, dict[str, float]]]:
    return [(r["dataset"], record_label(r), r["gradient"]) for r in result["results"]]
