"""Training: logits + cross-entropy, Adam or AdamW, early stopping on a validation split (never on
test), a progress bar, the GPU when present, and DistributedDataParallel when launched by torchrun.

Recipes (`TrainConfig.from_recipe`): "classic" is how models were trained before issue 11 (Adam,
no weight decay, select on validation accuracy); "localise" is the recipe for ICA models whose
saliency points at the evidence: weight decay 1e-2 as Adam's L2 term and training to convergence
(stop when the validation loss has not improved by `min_delta` for `patience` epochs, under a
generous `epochs` cap, then restore the best epoch). Measured (README, "Training recipe"): the
coupled L2 term is what localises; decoupled weight decay (AdamW, `optimizer="adamw"`) at the
same 1e-2 barely changes the saliency, because it shrinks every weight by lr * wd per step,
while Adam's L2 term, divided by the gradient's running scale, drives the weights of inputs that
carry no evidence to zero. Optional: a learning-rate schedule (cosine or
reduce-on-plateau) and an entropy penalty on the ICA attention rows (`attention_entropy`).

The result is a checkpoint holding everything export needs: weights, architecture, the input
standardisation fitted on the training split, names, metrics and how it was trained.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training.datasets import Dataset, Standardizer
from training.ica import InputCellAttention
from training.models import ModelConfig, RecurrentClassifier, build_model

CHECKPOINT_FORMAT = 1
OPTIMIZERS = ("adam", "adamw")
SELECT = ("accuracy", "loss")
LR_SCHEDULES = ("none", "cosine", "plateau")


@dataclass
class TrainConfig:
    epochs: int = 100  # a cap: early stopping normally ends training before it
    batch_size: int = 50
    lr: float = 1e-3
    # adam: L2 added to the gradient (coupled); adamw: decoupled weight decay (Loshchilov & Hutter)
    weight_decay: float = 0.0
    optimizer: str = "adam"
    patience: int = 15  # epochs without validation improvement before stopping
    min_delta: float = 0.0  # a validation loss must drop by more than this to count as improvement
    # what "improvement" means: accuracy (ties broken by loss) or loss alone; the best epoch by it is restored
    select: str = "accuracy"
    lr_schedule: str = "none"  # none, cosine (to lr_min over the `epochs` cap), plateau (halve on a loss plateau)
    lr_min: float = 0.0
    lr_patience: int = 5  # plateau schedule: epochs without val-loss improvement before halving
    # weight of the mean normalised entropy of the ICA attention rows A_t (0: off; > 0: sparser attention)
    attention_entropy: float = 0.0
    # weight decay of the ICA attention's own weights (encoder w1, w2); None: `weight_decay`. Measured
    # on the middle box (README, "Training recipe"): 0 here lets the attention's scores separate the
    # box from the rest, which moves the gradient's time profile onto the box.
    attention_weight_decay: float | None = None
    recipe: str = "custom"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    grad_clip: float = 5.0

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("select", SELECT), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "patience", "lr_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "min_delta", "lr_min", "attention_entropy", "grad_clip",
                     "attention_weight_decay"):
            value = getattr(self, name)
            if value is None and name == "attention_weight_decay":
                continue
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> "TrainConfig":
        """A named recipe (RECIPES) with some settings replaced; None values are ignored, so a
        command line can pass every flag and only the given ones override the recipe."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**RECIPES[recipe], "recipe": recipe, **given})


#: Named settings. "classic": the pre-issue-11 default. "localise": ICA models whose saliency
#: localises (README, "Training recipe"): Adam with weight decay 1e-2 (L2) on every weight but the
#: ICA attention's own (w1, w2: 0, so its scores can separate the evidence from the rest), trained
#: to convergence on the validation loss (min_delta 1e-4, patience 20, cap 500 epochs), best epoch
#: restored; with RECIPE_ICA_MODEL's wider cell.
RECIPES: dict[str, dict[str, Any]] = {
    "classic": {"epochs": 100, "optimizer": "adam", "weight_decay": 0.0, "patience": 15, "min_delta": 0.0,
                "select": "accuracy", "lr_schedule": "none", "attention_entropy": 0.0},
    "localise": {"epochs": 500, "optimizer": "adam", "weight_decay": 1e-2, "patience": 20, "min_delta": 1e-4,
                 "select": "loss", "lr_schedule": "none", "attention_entropy": 0.0, "attention_weight_decay": 0.0},
}

#: Model settings a recipe brings to ICA models where the caller sets none (the CLI, the
#: reproduction). Measured at full size (README, "Training recipe"): with the attention free of
#: weight decay, the gradient's AUC against the box rose with the cell's width, from hidden 5 to 64,
#: on every box dataset whose evidence sits inside the sequence.
RECIPE_ICA_MODEL: dict[str, dict[str, Any]] = {"localise": {"hidden": 64}}


def recipe_for(attention: str) -> str:
    """The default recipe of an architecture: "localise" for ICA models, "classic" otherwise."""
    return "localise" if attention == "ica" else "classic"


def recipe_model(recipe: str, attention: str) -> dict[str, Any]:
    """The model settings `recipe` brings to a model with this attention (RECIPE_ICA_MODEL; none but
    for ICA models)."""
    return dict(RECIPE_ICA_MODEL.get(recipe, {})) if attention == "ica" else {}


@dataclass
class TrainResult:
    model: RecurrentClassifier
    standardizer: Standardizer
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped: str = "cap"  # "plateau": early stopping ended it; "cap": it ran all `epochs`


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Distributed:
    """torchrun's environment, or a single process when not launched that way."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _tensors(ds: Dataset, std: Standardizer) -> TensorDataset:
    return TensorDataset(torch.from_numpy(std.apply(ds.X)), torch.from_numpy(ds.y))


@torch.no_grad()
def evaluate_loss_acc(model: nn.Module, data: TensorDataset, device: torch.device, batch: int = 256) -> dict[str, float]:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct, n = 0.0, 0, 0
    for xb, yb in DataLoader(data, batch_size=batch):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        total += loss_fn(logits, yb).item()
        correct += (logits.argmax(1) == yb).sum().item()
        n += len(yb)
    return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}


def attention_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Mean normalised entropy of the ICA attention rows, from the scores e (B, T, r).

    Row t of hop j is A_t = softmax over s <= t of e_s[j]. With w_s = exp(e_s - m) (m the hop's
    maximum over time, detached: softmax is shift-invariant) and Z_t = sum_{s<=t} w_s,

        H_t = log Z_t - sum_{s<=t} w_s (e_s - m) / Z_t,

    two prefix sums: O(B T r) memory instead of the (B, r, T, T) of forming A. Each row is divided
    by log(t + 1), its largest possible value, so the mean lies in [0, 1] whatever T; row 0 (one
    step, entropy 0) is left out. Float64, as ICA's own fallback: the weights stay far from
    underflow for any score spread tanh allows in practice.
    """
    b, t, r = scores.shape
    if t < 2:
        return scores.sum() * 0.0
    e = scores.double()
    z = e - e.detach().amax(dim=1, keepdim=True)
    w = torch.exp(z)
    total = torch.cumsum(w, dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    h = torch.log(total) - torch.cumsum(w * z, dim=1) / total  # (B, T, r)
    norm = torch.log(torch.arange(2, t + 1, dtype=torch.float64, device=scores.device)).view(1, -1, 1)
    return (h[:, 1:] / norm).mean().to(scores.dtype)


def _optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over `net`'s parameters; the ICA attention's weights (`encoder.`) in a group of
    their own when `attention_weight_decay` differs from `weight_decay`."""
    params: Any = net.parameters()
    if cfg.attention_weight_decay is not None and cfg.attention_weight_decay != cfg.weight_decay:
        named = list(net.named_parameters())
        own = [p for n, p in named if n.startswith(("encoder.", "module.encoder."))]  # module.: under DDP
        rest = [p for n, p in named if not n.startswith(("encoder.", "module.encoder."))]
        params = [{"params": rest}, {"params": own, "weight_decay": cfg.attention_weight_decay}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr_min)
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=0.5, patience=cfg.lr_patience, min_lr=cfg.lr_min)
    return None


def train(
    model_config: ModelConfig,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: TrainConfig | None = None,
    test_ds: Dataset | None = None,
    description: str = "training",
) -> TrainResult:
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ddp = Distributed(pick_device(cfg.device))
    device = ddp.device
    start = time.perf_counter()

    standardizer = Standardizer.fit(train_ds.X)
    train_data, val_data = _tensors(train_ds, standardizer), _tensors(val_ds, standardizer)
    model = build_model(model_config).to(device)
    penalised = cfg.attention_entropy > 0
    if penalised and not isinstance(model.encoder, InputCellAttention):
        raise ValueError(f"attention_entropy needs a model with input-cell attention, not {model_config.label}")
    net: nn.Module = model
    sampler = None
    if ddp.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(train_data, shuffle=True, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator
    )
    opt = _optimizer(net, cfg)
    scheduler = _scheduler(opt, cfg)
    loss_fn = nn.CrossEntropyLoss()

    best_state, best_epoch, stale, stopped = copy.deepcopy(model.state_dict()), 0, 0, "cap"
    best_acc, best_loss = -1.0, float("inf")
    history: list[dict[str, float]] = []
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, disable=not (cfg.progress and ddp.main)) as progress:
        task = progress.add_task(description, total=cfg.epochs, stats="")
        for epoch in range(1, cfg.epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            seen, loss_sum, correct, entropy_sum = 0, 0.0, 0, 0.0
            lr_now = opt.param_groups[0]["lr"]
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                logits = net(xb)
                loss = loss_fn(logits, yb)
                if penalised:
                    # The attention of the un-dropped input; the encoder's weights are the model's.
                    entropy = attention_entropy(model.encoder.scores(xb))
                    entropy_sum += entropy.item() * len(yb)
                    loss_total = loss + cfg.attention_entropy * entropy
                else:
                    loss_total = loss
                opt.zero_grad(set_to_none=True)
                loss_total.backward()
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
                seen += len(yb)
                loss_sum += loss.item() * len(yb)
                correct += (logits.argmax(1) == yb).sum().item()
            val = evaluate_loss_acc(model, val_data, device)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "lr": lr_now,
            }
            if penalised:
                row["train_attention_entropy"] = entropy_sum / seen
            history.append(row)
            # Improvement: a lower validation loss by more than min_delta ("loss"), or a higher
            # validation accuracy, ties broken that way ("accuracy"). The best epoch is restored.
            lower = val["loss"] < best_loss - cfg.min_delta
            if cfg.select == "loss":
                improved = lower
            else:
                improved = val["accuracy"] > best_acc or (val["accuracy"] == best_acc and lower)
            if improved:
                best_acc, best_loss, best_epoch, stale = val["accuracy"], val["loss"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val["loss"])
            elif scheduler is not None:
                scheduler.step()
            progress.update(
                task,
                advance=1,
                stats=f"loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} "
                f"val_loss {row['val_loss']:.3f} val_acc {row['val_accuracy']:.3f} best@{best_epoch}",
            )
            if cfg.progress and ddp.main and not progress.console.is_terminal:
                # No live bar in logs and CI: one line per epoch instead.
                progress.console.print(f"{description} epoch {epoch}/{cfg.epochs}: " + progress.tasks[task].fields["stats"])
            if stale >= cfg.patience:
                stopped = "plateau"
                break

    model.load_state_dict(best_state)
    model = model.cpu().eval()
    cpu = torch.device("cpu")
    metrics = {
        "train": evaluate_loss_acc(model, train_data, cpu),
        "validation": evaluate_loss_acc(model, val_data, cpu),
    }
    if test_ds is not None:
        metrics["test"] = evaluate_loss_acc(model, _tensors(test_ds, standardizer), cpu)
    ddp.close()
    return TrainResult(model, standardizer, metrics, history, best_epoch, time.perf_counter() - start, stopped)


def save_checkpoint(
    path: str | Path,
    result: TrainResult,
    class_names: list[str],
    feature_names: list[str],
    train_length: int,
    training_info: dict[str, Any],
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": result.model.config.to_dict(),
            "state_dict": result.model.state_dict(),
            "normalization": {"mean": result.standardizer.mean.tolist(), "std": result.standardizer.std.tolist()},
            "class_names": class_names,
            "feature_names": feature_names,
            "train_length": train_length,
            "metrics": result.metrics,
            "training": {**training_info, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2),
                         "epochs_run": len(result.history), "stopped": result.stopped},
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path) -> tuple[RecurrentClassifier, dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # torch raises several kinds for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an icaserve checkpoint (format {CHECKPOINT_FORMAT})")
    model = build_model(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def train_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
