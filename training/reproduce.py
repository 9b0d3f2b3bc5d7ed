"""Reproduce the paper's synthetic experiments: saliency quality of plain and input-cell-attention
recurrent models on the six box datasets (PAPER.md, "The synthetic experiments").

For every (dataset, model): train with early stopping on a validation split (never the test set),
then on the test split report accuracy and how well gradient saliency of the true class finds the
informative box (weighted Jaccard, Euclidean, ROC-AUC, top-k Jaccard; `training.evaluation`). For
the models in `tsr_models`, Temporal Saliency Rescaling over gradients is also scored, on the
first `tsr_samples` test samples only (it costs 1 + T + kept * N gradient passes per sample).

Writes `<out>/reproduction.md` (tables, settings, machine, run time, the paper's claim checked
per dataset), `<out>/reproduction.json` (every number) and PNG figures under `<out>/figures/`.

Jobs (one per dataset x model) run in `jobs` worker processes with one intra-op thread each: the
per-step GEMMs of a hidden-5 RNN are far too small to share between threads, and on a busy
machine extra threads mostly wait at OpenMP barriers.
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


@dataclass
class ReproConfig:
    datasets: list[str] = field(default_factory=lambda: [
        "earlier_box", "middle_box", "latter_box", "three_earlier_boxes", "three_middle_boxes", "mixed_boxes"])
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

    def __post_init__(self) -> None:
        from training.datasets import SYNTHETIC

        unknown = [d for d in self.datasets if d not in SYNTHETIC]
        if unknown or not self.datasets:
            raise ValueError(f"unknown dataset(s) {unknown}; choose from {', '.join(SYNTHETIC)}")
        bad = [m for m in [*self.models, *self.tsr_models] if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
        if self.tsr_datasets is not None:
            bad = [d for d in self.tsr_datasets if d not in SYNTHETIC]
            if bad:
                raise ValueError(f"unknown TSR dataset(s) {bad}; choose from {', '.join(SYNTHETIC)}")
        for name in ("n_train", "n_test", "T", "N", "epochs", "ica_epochs", "patience", "batch_size", "jobs", "saliency_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.tsr_samples < 0:
            raise ValueError("tsr_samples must be >= 0")

    @classmethod
    def quick_mode(cls, **changes: Any) -> "ReproConfig":
        """One dataset, two models, small sizes: about a minute on two cores."""
        base = dict(datasets=["earlier_box"], models=["lstm", "ica_lstm"], n_train=400, n_test=100,
                    T=40, N=40, epochs=40, ica_epochs=12, patience=10, tsr_samples=4, tsr_datasets=None,
                    jobs=2, quick=True)
        return cls(**{**base, **changes})

    def model_config(self, key: str):
        from training.models import ModelConfig

        return ModelConfig(n_features=self.N, n_classes=2, hidden=self.hidden, dropout=self.dropout,
                           r=self.r, d_a=self.d_a, **MODELS[key])

    def epoch_cap(self, key: str) -> int:
        return self.ica_epochs if MODELS[key].get("attention") == "ica" else self.epochs

    def runs_tsr(self, dataset: str, model: str) -> bool:
        wanted = self.tsr_datasets is None or dataset in self.tsr_datasets
        return self.tsr_samples > 0 and model in self.tsr_models and wanted


@dataclass(frozen=True)
class Job:
    index: int
    dataset: str
    model: str


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
    """Train one model on one dataset and score its saliency; returns plain data."""
    from training.evaluation import compute_saliency, score_saliency, time_profile, accuracy
    from training.models import inference_copy
    from training.train import TrainConfig, train

    fit_ds, val_ds, test_ds = _data(job.dataset, cfg.n_train, cfg.n_test, cfg.T, cfg.N, cfg.seed,
                                    cfg.val_fraction)
    mc = cfg.model_config(job.model)
    cap = cfg.epoch_cap(job.model)
    tc = TrainConfig(epochs=cap, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                     seed=cfg.seed, device="cpu", progress=False)
    _send(job, stage="training", epoch=0, cap=cap)
    with _epoch_reports(lambda n: _send(job, stage="training", epoch=min(n, cap), cap=cap)):
        result = train(mc, fit_ds, val_ds, tc, test_ds, description=f"{mc.label} on {job.dataset}")
    model = inference_copy(result.model)
    X = result.standardizer.apply(test_ds.X)
    y, masks = test_ds.y, test_ds.masks

    _send(job, stage="gradient saliency")
    t0 = time.perf_counter()
    grad = compute_saliency(model, X, y, "gradient", cfg.saliency_batch)
    record: dict[str, Any] = {
        "dataset": job.dataset,
        "model": job.model,
        "label": mc.label,
        "test_accuracy": result.metrics["test"]["accuracy"],
        "val_accuracy": result.metrics["validation"]["accuracy"],
        "train_accuracy": result.metrics["train"]["accuracy"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
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
    if cfg.runs_tsr(job.dataset, job.model):
        n = min(cfg.tsr_samples, len(X))
        _send(job, stage=f"TSR ({n} samples)")
        t0 = time.perf_counter()
        sal = compute_saliency(model, X[:n], y[:n], "tsr", batch=1, chunk_size=100)
        record["tsr"] = {"accuracy": accuracy(model, X[:n], y[:n]), **score_saliency(sal, masks[:n])}
        # Gradient saliency scored on the same samples, for a like-for-like comparison.
        record["gradient_on_tsr_subset"] = {"accuracy": record["tsr"]["accuracy"],
                                            **score_saliency(grad[:n], masks[:n])}
        record["tsr_example"] = sal[0].astype(np.float32)
        record["tsr_seconds"] = time.perf_counter() - t0
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
    jobs = [Job(i, d, m) for i, (d, m) in enumerate((d, m) for d in cfg.datasets for m in cfg.models)]
    labels = {k: cfg.model_config(k).label for k in MODELS}
    records: dict[int, dict[str, Any]] = {}
    columns = [TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with Progress(*columns, disable=not progress, refresh_per_second=2) as bar, \
            ProcessPoolExecutor(max_workers=min(cfg.jobs, len(jobs)), mp_context=ctx,
                                initializer=_init_worker, initargs=(q,)) as pool:
        overall = bar.add_task("[bold]reproduction[/] (dataset x model)", total=len(jobs), info="")
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
                    f"{job.dataset:<20} {rec['label']:<22} acc {rec['test_accuracy']:.3f}  "
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
        "references": {d: reference_scores(cfg, d) for d in cfg.datasets},
        "results": [_jsonable(r) for r in ordered],
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
    """Rough relative cost of a job, for scheduling only: sample-gradient passes weighted by
    model (an ICA model's pass costs ~60 plain ones: its (T, r, N) prefix sums)."""
    unit = 60.0 if MODELS[job.model].get("attention") == "ica" else 1.0
    passes = cfg.epoch_cap(job.model) * cfg.n_train + cfg.n_test
    if cfg.runs_tsr(job.dataset, job.model):
        passes += cfg.tsr_samples * (1 + cfg.T + 0.45 * cfg.T * cfg.N)
    return unit * passes


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
        name = f"  {job.dataset} · {labels[job.model]}"
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
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def claim_check(records: list[dict[str, Any]], acc_threshold: float = 0.95) -> list[dict[str, Any]]:
    """Per dataset and plain/ICA pair present: does the ICA model reach high accuracy with a
    weighted Jaccard clearly (> 0.05 absolute) above the plain model's?"""
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
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    by = {(r["dataset"], r["model"]): r for r in records}
    label = {r["model"]: r["label"] for r in records}
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
            f"(plain) and {cfg.ica_epochs} (ICA) so that the whole run fits in an hour on two cores "
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
            first = {d: next(r for r in records if r["dataset"] == d) for d in datasets}
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

    lines += ["", "## Figures", ""]
    for d in datasets:
        lines += [f"- {d}: [saliency maps](figures/{d}_saliency.png), "
                  f"[saliency mass per time step](figures/{d}_time_profile.png)"]
    lines += ["- all datasets: [saliency mass per time step](figures/time_profiles.png)", "",
              "![time profiles](figures/time_profiles.png)", ""]
    lines += [f"Raw numbers: `reproduction.json`. Total wall time {minutes:.1f} min.", ""]
    return "\n".join(lines)


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
            panels.append((f"{r['label']}\nacc {r['test_accuracy']:.2f}", minmax_scale(r["example"]["saliency"][None])[0]))
            if "tsr_example" in r:
                panels.append((f"{r['label']} + TSR", minmax_scale(r["tsr_example"][None])[0]))
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
        _plot_profiles(ax, [r for r in records if r["dataset"] == d], plt)
        ax.set_title(d, fontsize=9)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7)
    fig.suptitle("Share of gradient-saliency mass per time step (test mean); grey: ground truth", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    path = fig_dir / "time_profiles.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def _plot_profiles(ax: Any, recs: list[dict[str, Any]], plt: Any) -> None:
    # Log scale: vanishing saliency decays geometrically from the last step backwards, and the
    # end spikes of the plain models would otherwise flatten every other curve.
    floor = 1e-5
    truth = np.asarray(recs[0]["truth_profile"])
    steps = np.arange(len(truth))
    ax.fill_between(steps, floor, np.maximum(truth, floor), color="0.85", label="ground truth", step="mid")
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(recs):
        style = "-" if r["model"].startswith("ica") else "--"
        ax.plot(steps, np.maximum(r["profile"], floor), style, color=cmap(i % 10), lw=1.2, label=r["label"])
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
    return [(r["dataset"], r["label"], r["gradient"]) for r in result["results"]]
